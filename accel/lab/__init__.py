"""The lab: measure stacks on any diffusers pipeline (`accel run`, `accel ablate`, the benches).

One execution path for every model, the embedded digit models included: a pipeline is loaded from
`model.name` (`models`), the samples come from the recipe's `inputs`, a `Configuration` (a Stack,
or the pipeline as loaded) is applied with `accel.apply` and generated under the FLOP counter
(`generate`), scored by the one `Evaluator` against the full-compute reference of the same seeds,
and stored in the one `RecordStore` under the fingerprint of everything that determined it
(`job`, `records`, `fingerprint`). Human output comes from one `report` module.
"""

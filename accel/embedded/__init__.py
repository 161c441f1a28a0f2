"""The models the project ships, so that defaults and tests run offline.

* `flux-digits`: a real `FluxTransformer2DModel` (2 double + 6 single blocks, width 128) trained
  with the rectified-flow objective on 16x16 digits, class-conditional with a null class for CFG.
* the judge: an independent digit classifier, for class accuracy and FD features.
"""

from accel.embedded.judge import JUDGE_DIR, DigitJudge, JudgeFeatures, load_judge
from accel.embedded.model import (FLUX_DIGITS_DIR, NULL_CLASS, ClassConditioner, FluxDigits,
                                  build_flux_digits, load_flux_digits)

__all__ = ["JUDGE_DIR", "DigitJudge", "JudgeFeatures", "load_judge", "FLUX_DIGITS_DIR", "NULL_CLASS",
           "ClassConditioner", "FluxDigits", "build_flux_digits", "load_flux_digits"]

"""What is cached: the transformer residual, a block range, single blocks, attention, tokens, a UNet branch,
or each block under a learned router.

Each module holds one scope: its config, the per-branch state it keeps, its hooks and an
`apply_*` function that installs them for a CacheRuntime. `SCOPE_INSTALLERS` maps configs to those.
"""

from .attention import AttentionScope, apply_attention_scope
from .block_range import BlockRangeScope, ResidualScope, apply_block_range
from .deep_branch import DeepBranchScope, apply_deep_branch
from .router import RouterScope, apply_router_scope
from .single_blocks import SingleBlocksScope, apply_single_blocks
from .tokens import TokenScope, apply_token_scope

SCOPE_INSTALLERS = {
    ResidualScope: apply_block_range,
    BlockRangeScope: apply_block_range,
    SingleBlocksScope: apply_single_blocks,
    AttentionScope: apply_attention_scope,
    TokenScope: apply_token_scope,
    DeepBranchScope: apply_deep_branch,
    RouterScope: apply_router_scope,
}

__all__ = ["ResidualScope", "BlockRangeScope", "SingleBlocksScope", "AttentionScope", "TokenScope",
           "DeepBranchScope", "RouterScope", "SCOPE_INSTALLERS"]

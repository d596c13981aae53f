"""Vision Transformer layers in `keras.ops`, gathered from the modules that define them.

Each layer stores every constructor argument and returns it from `get_config`, builds its
sublayers in `build()`, and is registered (`vitexp>ClassName`) so a `.keras` checkpoint
reloads in safe mode. Importing this module registers them all.
"""

from vitexp.models.attention import MultiHeadSelfAttention
from vitexp.models.blocks import TransformerBlock
from vitexp.models.regularization import Dropout, DropPath, RandomStateMixin, draw_seed
from vitexp.models.tokenizers import ConvTokenizer, PatchTokenization
from vitexp.models.tokens import ClassToken, PositionEmbedding, TokenPooling, sincos_table

__all__ = [
    "ClassToken",
    "ConvTokenizer",
    "DropPath",
    "Dropout",
    "MultiHeadSelfAttention",
    "PatchTokenization",
    "PositionEmbedding",
    "RandomStateMixin",
    "TokenPooling",
    "TransformerBlock",
    "draw_seed",
    "sincos_table",
]

"""mLSTM (xLSTM) cell: one op with reference / chunked / Pallas forms, and the recurrent step for decoding.

`mlstm(q, k, v, i_preact, f_preact, ...)` is the op (impl = "auto" | "reference" | "chunked" | "pallas");
`mlstm_step` is its one-token form. See ops.py for the contract and reference.py for the maths.
"""

from .ops import IMPLS, mlstm, mlstm_step

__all__ = ["IMPLS", "mlstm", "mlstm_step"]

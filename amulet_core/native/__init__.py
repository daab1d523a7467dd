"""C kernels of the project's own, compiled at start for the machine (:mod:`amulet_core.native.build`).

Each source fixes its order of arithmetic, so its results do not depend on how many rows, tokens or threads a
call has: ``fixed_order_attention.c`` (the batch-invariant attention, wrapped by
:mod:`amulet_core.engine.fixed_order_kernel`) and ``q8_linear.c`` (an 8-bit output layer, wrapped by
:mod:`amulet_core.model.q8_output`). This package knows nothing of the engine or the model.
"""

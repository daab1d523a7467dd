"""C kernels of the project's own, compiled at start for the machine (:mod:`amulet_core.native.build`).

Each source fixes its order of arithmetic, so its results do not depend on how many rows, tokens or threads a
call has: ``fixed_order_attention.c`` (the batch-invariant attention, wrapped by
:mod:`amulet_core.engine.fixed_order_kernel`), ``q4_linear.c`` (``int4-q16`` products, wrapped by
:mod:`amulet_core.model.q4_linear`), ``q8_linear.c`` (an 8-bit output layer, wrapped by
:mod:`amulet_core.model.q8_output`) and ``layer_ops.c`` (the RMS norm and the rotary embedding in torch's order,
wrapped by :mod:`amulet_core.engine.layer_kernels`). This package knows nothing of the engine or the model.
"""

"""The compiled C++/CUDA kernels (csrc/), as two backends: ``cpp`` (:mod:`.cpu`) and
``cuda`` (:mod:`.cuda`). Nothing is loaded until a backend is first used; a missing or
broken build is reported by :func:`belay_kernels.backends` and the ops fall back to the
torch reference."""

"""`python -m mmard_jax.convert` (console script `mmard-convert`): the converter's command line; the library
is `mmard_jax.interop.convert`."""

from mmard_jax.interop.convert import run

if __name__ == "__main__":
    run()

"""`python -m mmard_jax.export` (console script `mmard-export`): the exporter's command line; the library is
`mmard_jax.interop.export`."""

from mmard_jax.interop.export import run

if __name__ == "__main__":
    run()

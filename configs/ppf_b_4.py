"""PPF-B-4 (paper Table 7). Patches/boundaries are not published: equal quarters with
(4,8),(4,4),(2,4),(2,2) reproduce its Testing FLOPs (46.5); CFG scales are not published either
(we extend B-3's schedule)."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_config('B', 4, (1.5, 1.5, 3.5, 4.0), arg=arg)

"""Table 4: Table 3's runs on CIFAR-100 (WRN-70-16 teacher, Gowal2020Uncovering).

    --config=configs/table4.py:method=mmard,student=mobilenet_v2
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_table3", pathlib.Path(__file__).with_name("table3.py"))
table3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table3)

DATASET = "cifar100"
RUNS = table3.runs(DATASET)
LAYOUT = table3.LAYOUT


def get_config(arg=None):
    return table3.get_config(arg, dataset=DATASET)

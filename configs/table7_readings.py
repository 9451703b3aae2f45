"""Table 7 under every reading of MMARD's unpublished choices: alpha x reading (configs/table7.py).

    python scripts/run_table.py --table=configs/table7_readings.py --workroot=runs/table7_readings
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_table7", pathlib.Path(__file__).with_name("table7.py"))
table7 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table7)

RUNS = tuple(f"alpha={a},reading={r}" for r in table7.READINGS for a in table7.ALPHAS)
LAYOUT = {"rows": "alpha", "groups": "reading", "columns": ("clean", "aa")}
get_config = table7.get_config

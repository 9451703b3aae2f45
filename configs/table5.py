"""Table 5: ARD, RSLAD and MMARD with teachers of growing capacity (RN-18 student, CIFAR-10, 50 epochs).

    --config=configs/table5.py:method=mmard,teacher=wrn70_16[,schedule=early]

Teachers (Table 2, "Other"): rn18 = Addepalli2021Towards_RN18, wrn34_10 = Zhang2019Theoretically,
wrn34_20 = Cui2020Learnable_34_20, wrn70_16 = Jia2022LAS-AT_70_16.

The paper trains "the early 50 epochs" (section 4.3). Two readings: `schedule=early` (default) runs the first 50
epochs of the 300-epoch cosine schedule (the learning rate is still 0.093 at the end), the literal reading;
`schedule=full` anneals a cosine over 50 epochs (a complete short run). docs/design.md, "Training".
"""

from mmard_jax import config_lib

METHODS = ("ard", "rslad", "mmard")
TEACHERS = ("rn18", "wrn34_10", "wrn34_20", "wrn70_16")
SCHEDULES = {"early": 300, "full": 50}  # optim.schedule_epochs of each reading

RUNS = tuple(f"method={m},teacher={t}" for m in METHODS for t in TEACHERS)
LAYOUT = {"rows": "method", "groups": "teacher", "columns": ("clean", "aa"), "metric_major": True, "average": True}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="mmard", teacher="wrn34_10", schedule="early")
    if a["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {a['schedule']!r}; known: {', '.join(SCHEDULES)}")
    c = config_lib.paper_config(a["method"], "resnet18", "cifar10", teacher=a["teacher"])
    c.num_epochs = 50
    c.optim.schedule_epochs = SCHEDULES[a["schedule"]]
    return c

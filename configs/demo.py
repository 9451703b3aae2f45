"""The demo's tiny runs on the embedded digits set (16x16x3, 10 classes), sized for a 2-core CPU.

`role=teacher` trains a robust teacher with TRADES; `role=student` distills a student from it with
MMARD (`teacher=DIR` names the teacher's workdir); `role=natural` trains the same student naturally.
"""

from mmard_jax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, role="student", teacher="", method="")
    method = a["method"] or {"teacher": "trades", "student": "mmard", "natural": "nature"}[a["role"]]
    c = config_lib.base_config(method, "wide_resnet" if a["role"] == "teacher" else "resnet18", "digits")
    if a["role"] == "teacher":
        c.student.kwargs = {"depth": 10, "width": 1}
    else:
        c.student.kwargs = {"base_width": 8}
    c.teacher.checkpoint = a["teacher"]
    c.dataset.crop_padding = 2
    c.dataset.flip = False  # digits are not mirror-symmetric
    c.batch_size = 64
    c.num_epochs = 10 if a["role"] == "teacher" else 8
    c.optim.schedule = "cosine"
    c.optim.boundaries = ()
    c.optim.lr = 0.05
    c.eval.every_epochs = c.num_epochs  # evaluate once, at the end (the demo's time goes to training)
    c.eval.batch_size = 360  # the whole digits test split (355) in one batch, divisible by 2, 4, 8 devices
    c.checkpoint_every_steps = 0
    c.log_every_steps = 10
    return c

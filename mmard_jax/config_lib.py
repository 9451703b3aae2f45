"""Building blocks of the experiment configs in configs/: the paper's settings (docs/design.md, "Training") as data.

Config files call `base_config(...)` and change fields; `parse_arg("method=rslad,student=mobilenet_v2")`
reads the `get_config(arg)` argument of parameterised files, each value typed like its default.
"""

from typing import Any, Dict, Optional

import ml_collections

from mmard_jax import methods, swa
from mmard_jax.models.layers import default_conv_grad

# Table 2 of the paper: the RobustBench teachers, as model directories made by `mmard_jax.convert`; then the
# teachers of the later methods' papers (configs/sota.py).
PAPER_TEACHERS = {
    ("cifar10", "wrn34_10"): "Zhang2019Theoretically",
    ("cifar100", "wrn70_16"): "Gowal2020Uncovering",
    ("cifar10", "rn18"): "Addepalli2021Towards_RN18",
    ("cifar10", "wrn34_20"): "Cui2020Learnable_34_20",
    ("cifar10", "wrn70_16"): "Jia2022LAS-AT_70_16",
    # AdaAD main.py:206-214 (CIFAR-10, Chen2021LTD_WRD34_20) and :226-230 (CIFAR-100, Chen2021LTD_WRN34_10).
    ("cifar10", "ltd_wrn34_20"): "Chen2021LTD_WRN34_20",
    ("cifar100", "ltd_wrn34_10"): "Chen2021LTD_WRN34_10",
    # IGDM: saad main.sh:4 (CIFAR-10) and ICLR_IGDM adaad_IGDM_cifar100.py:79-84 (CIFAR-100 'BDM').
    ("cifar10", "gowal_wrn28_10"): "Gowal2021Improving_28_10_ddpm_100m",
    ("cifar100", "bdm_wrn28_10"): "Wang2023Better_WRN-28-10",
    # Published outside RobustBench (interop/published.py, `convert --published=NAME`): DM-Improves-AT's WRN-28-10
    # Swish teachers, the only teachers SAAD loads for its Tiny-ImageNet and SVHN rows (saad utils.py:210-227).
    ("tiny_imagenet", "tiny_linf_wrn28-10"): "tiny_linf_wrn28-10",
    ("svhn", "svhn_linf_wrn28-10"): "svhn_linf_wrn28-10",
}
DEFAULT_TEACHER = {"cifar10": "wrn34_10", "cifar100": "wrn70_16", "tiny_imagenet": "tiny_linf_wrn28-10",
                   "svhn": "svhn_linf_wrn28-10"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10, "tiny_imagenet": 200, "svhn": 10, "imagenet": 1000}


def teacher_dir(dataset: str, teacher: Optional[str] = None) -> str:
    """Where the README's convert commands put a paper teacher: teachers/<RobustBench or published name>_<dataset>
    (e.g. `teacher_dir('tiny_imagenet', 'tiny_linf_wrn28-10')` = teachers/tiny_linf_wrn28-10_tiny_imagenet)."""
    key = (dataset, teacher or DEFAULT_TEACHER.get(dataset, ""))
    if key not in PAPER_TEACHERS:
        known = ", ".join(f"{d}:{t}" for d, t in PAPER_TEACHERS)
        raise ValueError(f"no paper teacher {key[1]!r} for {dataset}; known: {known}")
    return f"teachers/{PAPER_TEACHERS[key]}_{dataset}"


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_value(key: str, text: str, default: Any) -> Any:
    """One config argument's text as the type of its default: bool ('true'/'false', '1'/'0', 'yes'/'no'), int,
    float, a tuple ('+'-separated items, typed like the default's first item, else str) or str."""
    try:
        if isinstance(default, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError("expected true or false")
            return text.lower() in _TRUE
        if isinstance(default, tuple):
            item = type(default[0]) if default else str
            return tuple(parse_value(key, t, item()) for t in text.split("+") if t)
        if isinstance(default, (int, float)):
            return type(default)(text)
    except ValueError as err:
        raise ValueError(f"config argument {key}={text!r}: not a {type(default).__name__} ({err})") from None
    return text


def parse_arg(arg: Optional[str], **defaults) -> Dict[str, Any]:
    """'k1=v1,k2=v2' -> dict over `defaults`, each value typed like its default (`parse_value`, as big_vision's
    parse_arg); an unknown key is an error naming the accepted ones."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} is not key=value (accepted keys: {sorted(defaults)})")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; accepted: {sorted(defaults)}")
        out[key] = parse_value(key, value, defaults[key])
    return out


def method_block(name: str, inner: str = "", outer: str = "", plugins=(), dataset: str = "",
                 **overrides) -> ml_collections.ConfigDict:
    """`config.method`: name, inner/outer ('' = the method's own), plug-ins, and every hyper-parameter (the
    published defaults for `dataset`, then `overrides`)."""
    published = methods.dataset_hparams(name, dataset, plugins) if outer in ("", None) else {}
    hparams = {**published, **overrides}
    resolved = methods.get_method(name, inner=inner or None, outer=outer or None, plugins=tuple(plugins), **hparams)
    block = {"name": name, "inner": inner, "outer": outer, "plugins": tuple(plugins)}
    block.update(resolved.hparams)
    return ml_collections.ConfigDict(block)


def resolve_method(method_cfg) -> methods.Method:
    """The config's `method` block -> a resolved Method (its other fields are hyper-parameters)."""
    cfg = dict(method_cfg)
    name, inner, outer = cfg.pop("name"), cfg.pop("inner", "") or None, cfg.pop("outer", "") or None
    plugins = tuple(cfg.pop("plugins", ()) or ())
    return methods.get_method(name, inner=inner, outer=outer, plugins=plugins, **cfg)


def optim_block(**overrides) -> ml_collections.ConfigDict:
    """An optimizer block: the paper's SGD (section 4.1: lr 0.1, momentum 0.9, wd 2e-4, cosine) with overrides.

    `schedule_epochs` (0: num_epochs) is the length the schedule anneals over: a run can stop before its end
    (Table 5's "early 50 epochs" of a 300-epoch schedule)."""
    block = {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "nesterov": False,
             "schedule": "cosine", "boundaries": (), "decay": 0.1, "per_epoch": False, "schedule_epochs": 0}
    block.update(overrides)
    return ml_collections.ConfigDict(block)


# CIARD's robust-teacher optimizer (config.rteacher.optim; eminentgu/CIARD @93a9a2d CIARD.py:148-149, :272-279).
RTEACHER_OPTIM = {"lr": 1e-4, "momentum": 0.1, "weight_decay": 2e-4, "schedule": "cosine_exp", "boundaries": (49,)}

# Published training recipes where a method's code differs from the paper's unified one (section 4.1):
# method -> {num_epochs, optim overrides, attack overrides, batch_size per dataset}. The MMARD paper keeps "the
# default settings of the original papers" for its baselines (section 4.1, "Baselines"): Tables 3 and 4 use
# these (`recipe="published"`); configs/sota.py too.
PIECEWISE = {"schedule": "piecewise", "per_epoch": True}
RECIPES = {
    # Madry cifar10_challenge config.json:11-18: 80k steps of 128 (205 epochs), lr 0.1 -> 0.01 at step 40k ->
    # 0.001 at 60k (epochs 102.6 and 153.8, to the nearest epoch here), wd 2e-4 (on kernels only there).
    "sat": {"num_epochs": 205, "optim": {**PIECEWISE, "boundaries": (103, 154)}},
    # TRADES train_trades_cifar10.py:20 (76 epochs), :137-147 (x0.1 from the 75th epoch), :30-34 (eps 0.031,
    # step 0.007, 10 steps).
    "trades": {"num_epochs": 76, "optim": {**PIECEWISE, "boundaries": (74,)},
               "attack": {"eps": 0.031, "step_size": 0.007}},
    # ARD main.py:18 (200 epochs), :15-17 + :32-36 (the flags say x0.1 at [100, 150], the code decays once, to
    # 0.01 at 100: we follow the code), :49/:55 (batch 128 on CIFAR-10, 256 on CIFAR-100).
    "ard": {"num_epochs": 200, "optim": {**PIECEWISE, "boundaries": (100,)}, "batch_size": {"cifar100": 256}},
    # IAD-I.py:18-21 and :49-53: ARD's schedule (the same single decay at 100), 200 epochs.
    "iad": {"num_epochs": 200, "optim": {**PIECEWISE, "boundaries": (100,)}},
    # RSLAD resnet18_rslad_cifar10.py:15-17 (300 epochs) and :84-86 (x0.1 after epochs 215, 260, 285).
    "rslad": {"num_epochs": 300, "optim": {**PIECEWISE, "boundaries": (215, 260, 285)}},
    # MTARD mtard_resnet18_cifar10.py:16 and :135-138 (as RSLAD; the weights' lr decays with it).
    "mtard": {"num_epochs": 300, "optim": {**PIECEWISE, "boundaries": (215, 260, 285)}},
    # ABSLD (zhaoshiji123/ABSLD @7407c3a) resnet18_absld_cifar10.py:20-21 (300 epochs, batch 128), :54 (SGD 0.1,
    # momentum 0.9, wd 2e-4), :173-176 (x0.1 after epochs 215, 260, 285; the temperatures' rate with it).
    "absld": {"num_epochs": 300, "optim": {**PIECEWISE, "boundaries": (215, 260, 285)}},
    # CIARD (eminentgu/CIARD @93a9a2d) CIARD.py:33-34 (300 epochs, batch 128), :76 (SGD 0.1, momentum 0.9, wd 2e-4),
    # :262-270 (0.1 until 1-based epoch 150, then (1 + cos) / 2 x exp per epoch: 'cosine_exp' from 0-based 149),
    # :52-56 (crop 32 padded by 4, flip), :209-210 (eps 8/255, step 2/255, 10 steps). The robust teacher's optimizer
    # is config.rteacher.optim (RTEACHER_OPTIM).
    "ciard": {"num_epochs": 300, "optim": {"schedule": "cosine_exp", "boundaries": (149,), "per_epoch": True}},
    # AdaAD main.py:58-64 (200 epochs, SGD 0.1, momentum 0.9, wd 5e-4) and :113-139 (x0.1 at epochs 100, 150).
    "adaad": {"num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 5e-4, "boundaries": (100, 150)}},
    "adaiad": {"num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 5e-4, "boundaries": (100, 150)}},
    # DGAD (kunsaram01/DGAD @a0329c8) main.py:64-70 (200 epochs, batch 128, SGD lr 0.1, momentum 0.9, wd 5e-4),
    # :120-135 with :300-301 (the epoch's lr: 0.1, x0.1 from 0-based epoch 100, x0.01 from 150), :55-57 (eps 8/255,
    # step 2/255, 10 steps: the defaults), config/dataset_config.py:12-16 (crop 32 padded by 4, flip: the default).
    "dgad": {"num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 5e-4, "boundaries": (100, 150)}},
    # saad igdm.py:38 (wd 2e-4), :95-97 (x0.1 after epochs 100 and 150), args.py:20-23 (200 epochs).
    "igdm": {"num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 2e-4, "boundaries": (100, 150)}},
    # PeerAiD configs/PeerAiD_resnet18_cifar10.json (300 epochs, lr 0.1 for both networks, wd 2e-4), main.py:840-852
    # (/10 at epochs 214, 259, 284). SWA student: every README.md command passes --swa_s (README.md:31-65); it starts
    # at the student's first lr decay (main.py:110-111: swa_s_start = lr_decay_epochs_student[0]), is averaged after
    # every epoch from there (main.py:427-432) and its BN statistics recomputed each time (utils/SWA.py:61-88).
    "peeraid": {"num_epochs": 300, "optim": {**PIECEWISE, "weight_decay": 2e-4, "boundaries": (214, 259, 284)},
                "swa": {"enabled": True, "start_epoch": swa.FIRST_DECAY}},
    # SAAD (HongsinLee/saad @295121c; the row `saad`, mmard_jax/methods/saad.py):
    # args.py:20-21 (200 epochs, batch 128), saad.py:39 (SGD 0.1, momentum 0.9, wd 2e-4), saad.py:128-130 (x0.1
    # after 1-based epochs 100 and 150, i.e. from 0-based epochs 100 and 150). SWA: saad.py:41 AveragedModel, from
    # the 1-based epoch --swa_epoch 95 (args.py:17; saad.py:46, 91: 0-based epoch 94), once per epoch, update_bn
    # over the train loader after each average (saad.py:93-94).
    "saad": {"num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 2e-4, "boundaries": (100, 150)},
             "swa": {"enabled": True, "start_epoch": 94}},
    # Beyond CIFAR (configs/sota.py; docs/design.md, "Tiny-ImageNet and SVHN rows"): recipes named by the published
    # run they reproduce, with the data set's augmentation (`dataset`) where it is not CIFAR's.
    # PeerAiD ResNet-18 on Tiny-ImageNet (jaewonalive/PeerAiD @cd12e92): configs/PeerAiD_resnet18_tinyimagenet.json:1
    # (200 epochs, lr 0.1 for both networks, /10 at 0-based epochs 99 and 149, batch 128, wd 2e-4; main.py:840-852
    # divides from the boundary epoch on), main.py:131-134 + :29 (PGD-10, eps 8/255, step 2/255), README.md:46
    # (--swa_s; SWA from the first decay, main.py:110-111: epoch 99), datasets/datasets.py:11-20 (crop 64 padded by
    # 4, flip), datasets/TinyImageNetDataset.py:36-39, 62, 71 (classes in wnids.txt order).
    "peeraid_tiny_imagenet_resnet18": {
        "num_epochs": 200, "optim": {**PIECEWISE, "lr": 0.1, "weight_decay": 2e-4, "boundaries": (99, 149)},
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}, "batch_size": {"tiny_imagenet": 128},
        "swa": {"enabled": True, "start_epoch": swa.FIRST_DECAY},
        "dataset": {"crop_padding": 4, "flip": True, "class_order": "wnids"}},
    # PeerAiD WRN-34-10 on Tiny-ImageNet: configs/PeerAiD_wideresnet34x10_tinyimagenet.json:1 (100 epochs, /10 at
    # 0-based epochs 49 and 79, the rest as ResNet-18's), README.md:65 (--swa_s: SWA from epoch 49).
    "peeraid_tiny_imagenet_wrn34_10": {
        "num_epochs": 100, "optim": {**PIECEWISE, "lr": 0.1, "weight_decay": 2e-4, "boundaries": (49, 79)},
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}, "batch_size": {"tiny_imagenet": 128},
        "swa": {"enabled": True, "start_epoch": swa.FIRST_DECAY},
        "dataset": {"crop_padding": 4, "flip": True, "class_order": "wnids"}},
    # AdaAD and IGDM as SAAD's scripts run them on Tiny-ImageNet (HongsinLee/saad @295121c, `--dataset tinyimg`,
    # args.py:34): adaad.py:38 and igdm.py:38 (SGD lr args.lr = 0.1 (args.py:24), momentum 0.9, wd 2e-4), args.py:20
    # and :22 (200 epochs, batch 128), adaad.py:90-92 and igdm.py:95-97 (x0.1 after 1-based epochs 100 and 150:
    # from 0-based 100 and 150), utils.py:123-127 (crop 64 padded by 8, flip), utils.py:109 (ImageFolder: sorted
    # wnids). Attack: adaad_inner_loss's own defaults, PGD-10 eps 8/255 step 2/255 (attacks.py:197-202); the
    # scripts pass them swapped (adaad.py:49, igdm.py:49; docs/design.md "Deviations" 5: not followed).
    "saad_scripts_tiny_imagenet": {
        "num_epochs": 200, "optim": {**PIECEWISE, "lr": 0.1, "weight_decay": 2e-4, "boundaries": (100, 150)},
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}, "batch_size": {"tiny_imagenet": 128},
        "dataset": {"crop_padding": 8, "flip": True, "class_order": "sorted"}},
    # The same scripts on SVHN (`--dataset svhn`): no augmentation at all (utils.py:138-140: ToTensor only).
    "saad_scripts_svhn": {
        "num_epochs": 200, "optim": {**PIECEWISE, "lr": 0.1, "weight_decay": 2e-4, "boundaries": (100, 150)},
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}, "batch_size": {"svhn": 128},
        "dataset": {"crop_padding": 0, "flip": False}},
    # SAAD on Tiny-ImageNet and SVHN (HongsinLee/saad @295121c saad.py with `--dataset tinyimg | svhn`): SAAD's own
    # recipe (above), batch 128 (args.py:22), and the data set's augmentation in utils.py: crop 64 padded by 8 and
    # flip (:123-127), ImageFolder's sorted wnids (:109); SVHN none at all (:138-140).
    "saad_tiny_imagenet": {
        "num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 2e-4, "boundaries": (100, 150)},
        "swa": {"enabled": True, "start_epoch": 94}, "batch_size": {"tiny_imagenet": 128},
        "dataset": {"crop_padding": 8, "flip": True, "class_order": "sorted"}},
    "saad_svhn": {
        "num_epochs": 200, "optim": {**PIECEWISE, "weight_decay": 2e-4, "boundaries": (100, 150)},
        "swa": {"enabled": True, "start_epoch": 94}, "batch_size": {"svhn": 128},
        "dataset": {"crop_padding": 0, "flip": False}},
}
# Fair-ARD's plug-in on its four base methods (NISP-official/Fair-ARD @910c8cd): each script keeps its base method's
# schedule and adds SGD's Nesterov momentum (Fair-ARD.py:160, Fair-IAD.py:214, Fair-RSLAD.py:85, Fair-MTARD.py:84,
# all lr 0.1, momentum 0.9, wd 2e-4). Fair-ARD/IAD: 200 epochs, x0.1 once, at 0-based epoch 100 (Fair-ARD.py:13-16,
# 30-34, 159-164: `adjust_learning_rate` re-derives the rate from args.lr, so the flag's second decay at 150 sets
# 0.01 again, ARD's own bug; Fair-IAD.py:14-17, 45-49 the same). Fair-RSLAD/MTARD: 300 epochs, x0.1 after 1-based
# epochs 215, 260, 285 (Fair-RSLAD.py:21, 110, 147-149; Fair-MTARD.py:21, 125, 185-188), as RSLAD's and MTARD's.
for _base in ("ard", "iad", "rslad", "mtard"):
    RECIPES[f"fair_{_base}"] = {**RECIPES[_base], "optim": {**RECIPES[_base]["optim"], "nesterov": True}}


def apply_recipe(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The published recipe RECIPES[method] (a method's name, or a named run such as
    'peeraid_tiny_imagenet_resnet18') on a config, for the student and a peer alike; none: `c` unchanged."""
    recipe = RECIPES.get(method)
    if recipe is None:
        return c
    c.num_epochs = recipe["num_epochs"]
    for block in (c.optim, c.peer.optim):
        block.update(recipe["optim"])
    c.attack.update(recipe.get("attack", {}))
    c.swa.update(recipe.get("swa", {}))
    c.dataset.update(recipe.get("dataset", {}))
    c.batch_size = recipe.get("batch_size", {}).get(c.dataset.name, c.batch_size)
    return c


def base_config(method: str = "mmard", student: str = "resnet18", dataset: str = "cifar10",
                teacher: Optional[str] = None, inner: str = "", plugins=()) -> ml_collections.ConfigDict:
    """The paper's training recipe (section 4.1) for one (method, student, dataset)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(
        {"name": dataset, "data_dir": "", "source": "auto", "download": False, "crop_padding": 4, "flip": True,
         "n_train": -1,  # n_train > 0: train on the first n_train examples only (smoke runs)
         "class_order": "",  # tiny_imagenet's labels: '' = data.load_dataset's default ('sorted'), or 'wnids'
         # The input pipeline (mmard_jax/input_pipeline.py): 'device' (the split resident on every device), 'stream'
         # (grain reads, augments and batches on the CPU), 'auto' (streams splits over data.stream.AUTO_STREAM_BYTES);
         # the streamed augmentation ('pad_crop' | 'random_resized_crop'), the images' side (0: as stored), the test
         # split of folder/tfds sources, and grain's worker processes (0: read by threads in the trainer's process).
         "pipeline": "device", "augment": "pad_crop", "image_size": 0, "test_split": "test", "workers": 0}
    )
    # conv_grad: how the convolutions' input gradient is computed, 'auto' | 'custom' | 'lax'
    # (layers.resolve_conv_grad; default $MMARD_JAX_CONV_GRAD or 'auto'); the student's also serves the peer.
    c.student = ml_collections.ConfigDict({"arch": student, "kwargs": ml_collections.ConfigDict(), "dtype": "float32",
                                           "conv_grad": default_conv_grad()})
    c.method = method_block(method, inner=inner, plugins=plugins, dataset=dataset)
    networks = resolve_method(c.method).networks()
    # CIARD's trained robust teacher starts from config.teacher's checkpoint.
    needs_teacher = bool({"teacher", "rteacher"} & networks) and dataset in DEFAULT_TEACHER
    # teacher.conv_grad also serves teacher2.
    c.teacher = ml_collections.ConfigDict(
        {"checkpoint": teacher_dir(dataset, teacher) if needs_teacher else "", "dtype": "float32",
         "conv_grad": default_conv_grad()}
    )
    # MTARD's second (naturally trained) teacher; the paper reports MTARD's published numbers because
    # the clean teachers are unpublished. Train one with configs/default.py:method=nature,student=wide_resnet.
    c.teacher2 = ml_collections.ConfigDict(
        {"checkpoint": f"teachers/natural_wrn34_10_{dataset}" if "teacher2" in networks else "", "dtype": "float32"}
    )
    # PeerAiD's peer: the student's architecture unless set (PeerAiD README.md:31), its own optimizer.
    c.peer = ml_collections.ConfigDict({"arch": "", "kwargs": ml_collections.ConfigDict(), "dtype": "float32",
                                        "optim": optim_block()})
    # CIARD's robust teacher, trained during distillation from config.teacher's checkpoint with its own optimizer
    # (eminentgu/CIARD @93a9a2d CIARD.py:148-149: SGD lr 1e-4, momentum 0.1, wd 2e-4; :272-279: the rate from
    # 1-based epoch 50 decays as (1 + cos) / 2 x exp; the 300 epochs of :33 are the run's).
    c.rteacher = ml_collections.ConfigDict({"optim": optim_block(**RTEACHER_OPTIM)})
    # Inner maximization: PGD-10, eps 8/255, step 2/255; the start and the student's BatchNorm mode follow
    # the method's published code (methods.ROWS), the Gaussian start has scale 0.001.
    c.attack = ml_collections.ConfigDict(
        {"norm": "Linf", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "gaussian_scale": 1e-3, "unroll": "auto",
         **methods.attack_defaults(method, inner or None)}
    )
    c.optim = optim_block()
    c.batch_size = 128
    c.num_epochs = 300
    if method == "nature":  # 100 epochs, lr / 10 at epochs 75 and 90
        c.num_epochs = 100
        c.optim.schedule = "piecewise"
        c.optim.boundaries = (75, 90)
    c.eval = ml_collections.ConfigDict({
        "every_epochs": 1,
        "attacks": ("clean", "pgd_s", "pgd_t"),
        "final_attacks": ("clean", "fgsm", "pgd_s", "pgd_t", "cw"),
        "norm": "Linf",
        "eps": 8 / 255,
        "batch_size": 500,
        "n_examples": -1,
        "chunk_size": 0,  # > 0: the test split streamed from its source this many at a time (input_pipeline)
        "unroll": "auto",  # 'auto' | 'full' | 'N': see runtime.resolve_unroll
        "matmul_precision": "highest",  # float32 models at full float32 precision (no TF32 on GPUs)
    })
    c.best_metric = "pgd_t"  # paper section 4.2: best checkpoint by PGD_T robust accuracy (the SWA student's too)
    # Stochastic weight averaging of the student (mmard_jax/swa.py): off here; the published recipes of PeerAiD and
    # SAAD turn it on (RECIPES). start_epoch -1: the first boundary of optim.boundaries.
    c.swa = ml_collections.ConfigDict(swa.block())
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 50
    return c


# The L2 threat model of adversarial training on CIFAR (Rice et al. 2020, "Overfitting in adversarially robust
# deep learning", Table 1: eps 128/255, 10 steps of 15/255; locuslab/robust_overfitting @263b826 train_cifar.py,
# `attack_pgd`'s l_2 branch: the normalised-gradient step, then the ball and the box), RobustBench's L2 radius
# 0.5 for evaluation.
L2_ATTACK = {"eps": 128 / 255, "step_size": 15 / 255, "steps": 10}
L2_EVAL_EPS = 0.5


def threat_model(c: ml_collections.ConfigDict, norm: str) -> ml_collections.ConfigDict:
    """`c` trained and evaluated under `norm`: 'Linf' leaves it as it is; 'L2' sets the inner maximization of
    every method to L2 PGD with the published L2 step rule (L2_ATTACK) and the evaluation to L2 at L2_EVAL_EPS."""
    if norm == "Linf":
        return c
    if norm != "L2":
        raise ValueError(f"unknown norm {norm!r}; known: Linf, L2")
    c.attack.update(norm="L2", **L2_ATTACK)
    c.eval.update(norm="L2", eps=L2_EVAL_EPS)
    return c


RECIPE_CHOICES = ("published", "unified")


def paper_config(method: str, student: str, dataset: str, teacher: Optional[str] = None, inner: str = "",
                 recipe: str = "unified", **hparams) -> ml_collections.ConfigDict:
    """A run of the paper's tables: `base_config` plus an inner objective and outer hyper-parameters.

    The final evaluation adds AutoAttack (the tables' AA column); the method's name stays the outer
    objective's, so Table 6's "ARD" with MMARD's inner process is `paper_config("ard", ..., inner="mmard")`.
    `recipe="published"` trains a baseline with its own code's recipe (RECIPES), `"unified"` with the paper's.
    """
    if recipe not in RECIPE_CHOICES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPE_CHOICES)}")
    c = base_config(method, student, dataset, teacher, inner=inner)
    c.method = method_block(method, inner=inner, dataset=dataset, **hparams)
    if recipe == "published":
        apply_recipe(c, method)
    c.eval.final_attacks = ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")
    return c

"""The state of the art in one table: AdaAD, AdaIAD, IGDM and PeerAiD beside MMARD, each with its paper's teacher
and its published recipe (config_lib.RECIPES), ResNet-18 on CIFAR-10 first, then MobileNetV2 and CIFAR-100 where
the papers report them, then Tiny-ImageNet (64x64, 200 classes) and SVHN as the published code runs them.

    python scripts/run_table.py --table=configs/sota.py --workroot=runs/sota
    --config=configs/sota.py:method=adaiad,setting=resnet18_cifar10,plugins=igdm     # IGDM on AdaIAD
    --config=configs/sota.py:method=igdm,setting=preact_resnet18_tiny_imagenet       # IGDM, Tiny-ImageNet

Teachers: AdaAD/AdaIAD/IGDM Chen2021LTD WRN-34-20 (CIFAR-10) / WRN-34-10 (CIFAR-100) (AdaAD main.py:206-230;
the IGDM paper follows AdaAD; its CIFAR-10 script also offers `teacher=gowal_wrn28_10`), MMARD the paper's
WRN-34-10 / WRN-70-16; PeerAiD trains its peer from scratch (no teacher). On Tiny-ImageNet and SVHN, AdaAD and IGDM
run as SAAD's scripts run them (HongsinLee/saad @295121c adaad.py, igdm.py; the only published code training
either there): DM-Improves-AT's WRN-28-10 teachers `tiny_linf_wrn28-10` / `svhn_linf_wrn28-10` (saad
utils.py:210-227), SAAD's PreAct-ResNet-18 student on Tiny-ImageNet (`preact_resnet18_saad`; utils.py:182-186 allows
no other) and ResNet-18 on SVHN (args.py:32, main.sh:5); PeerAiD reports ResNet-18 and WRN-34-10 on Tiny-ImageNet
(README.md:43-66) and no SVHN. Recipes: config_lib.RECIPES['saad_scripts_tiny_imagenet' | 'saad_scripts_svhn' |
'peeraid_tiny_imagenet_resnet18' | 'peeraid_tiny_imagenet_wrn34_10'].

ABSLD (NeurIPS 2024) runs on CIFAR-10 with ResNet-18 and TRADES' WRN-34-10, as its one published script.
Fair-ARD (NeurIPS 2023) is the plug-in `fair` on ARD, IAD, RSLAD and MTARD; its rows `fair_ard`, `fair_iad`,
`fair_rslad`, `fair_mtard` run each base method with `plugins=fair` and the script's recipe
(config_lib.RECIPES['fair_<base>']) on CIFAR-10 with ResNet-18, the only setting its scripts run (Fair-ARD.py:46-48,
85-86), and the scripts' teacher: a WideResNet-34-10 (models/wideresnet.py defaults; our paper teacher of that
architecture); Fair-MTARD's script loads a natural teacher too (Fair-MTARD.py:100-102) but its loss never reads
it (:134, :144), so that row has none (`fair_mtard_nat_teacher='t2_nat'` is the reading that uses it).

SAAD (TMLR 2026, `method=saad`) runs as its saad.py: ResNet-18 on CIFAR-10 with main.sh's teacher
Gowal2021Improving_28_10_ddpm_100m (main.sh:4, `gowal_wrn28_10`), SAAD's pResNet18 on Tiny-ImageNet and ResNet-18
on SVHN with the DM-Improves-AT teachers (utils.py:207-227), recipe RECIPES['saad'] (SWA from 0-based epoch 94) with
the data set's augmentation on Tiny-ImageNet/SVHN (RECIPES['saad_tiny_imagenet' | 'saad_svhn']). The script names no
CIFAR-100 teacher (args.py:30's default 'WRN-70-16' is no RobustBench name), so no CIFAR-100 row: run it with
`teacher=...` (igdm_alpha 10 there, saad.py:72).


DGAD (ECCV 2024; kunsaram01/DGAD @a0329c8) runs ResNet-18 and MobileNetV2 on CIFAR-10 and ResNet-18 on CIFAR-100 with
its main.py's teachers: Chen2021LTD WRN-34-20 on CIFAR-10 (`--teacher_model Chen2021LTD_WRD34_20`, main.py:213-221;
its default `wideresnet34_10` loads an unpublished `robust_teacher.pth`, :208-211) and Chen2021LTD WRN-34-10 on
CIFAR-100 (main.py:233-237), recipe RECIPES['dgad'] (main.py:64-70, :120-135); the MobileNetV2 row takes the
script's MobileNetV2 loss (`dgad_form='mobilenetv2_script'`, main.py:439-441). Its Tiny-ImageNet run (main_tiny.py)
distils its own TRADES PreAct-ResNet-18 (`teacher_models/TinyImageNet/TRADES/best_PGD10_acc_model.pth`,
main_tiny.py:226-229), whose weights are not published: no `preact_resnet18_dgad` row.

CIARD (ICCV 2025; eminentgu/CIARD @93a9a2d) runs as CIARD.py: MobileNetV2 (CIARD.py:67) and ResNet-18 on CIFAR-10, and
ResNet-18 on CIFAR-100, recipe RECIPES['ciard'] (300 epochs, 'cosine_exp' from 0-based epoch 149). Its robust teacher
(trained during the run, config.rteacher.optim) starts from config.teacher: TRADES' WRN-34-10 on CIFAR-10 (CIARD.py:
136 loads `model_cifar_wrn.pt`, Zhang2019Theoretically), the paper teacher WRN-70-16 on CIFAR-100 (the script names
none). Its clean teacher is config.teacher2, a naturally trained network of the user's (the script's ResNet-56,
CIARD.py:154-155, has no architecture here; docs/design.md "Deviations" 37).

"""

from mmard_jax import config_lib

METHODS = ("mmard", "adaad", "adaiad", "igdm", "peeraid")
# setting -> (student arch, student kwargs, dataset)
SETTINGS = {"resnet18_cifar10": ("resnet18", {}, "cifar10"), "mobilenet_v2_cifar10": ("mobilenet_v2", {}, "cifar10"),
            "resnet18_cifar100": ("resnet18", {}, "cifar100"),
            # SAAD's pResNet18 (saad utils.py:182-186, cifar100_models/preresnet.py)
            "preact_resnet18_tiny_imagenet": ("preact_resnet18_saad", {}, "tiny_imagenet"),
            # PeerAiD --s_type resnet18 / wideresnet34x10 (README.md:46, :65)
            "resnet18_tiny_imagenet": ("resnet18", {}, "tiny_imagenet"),
            "wrn34_10_tiny_imagenet": ("wide_resnet", {"depth": 34, "width": 10}, "tiny_imagenet"),
            # SAAD's RES-18 on SVHN (saad utils.py:189-194, args.py:32)
            "resnet18_svhn": ("resnet18", {}, "svhn")}
# Fair-ARD's rows: row name -> the base method its script runs with `plugins=fair` (module docstring).
FAIR = {"fair_ard": "ard", "fair_iad": "iad", "fair_rslad": "rslad", "fair_mtard": "mtard"}
# The methods each setting's papers report. PeerAiD: ResNet-18 and WRN-34-10 students, no MobileNetV2 (PeerAiD
# README.md:31-65). Tiny-ImageNet/SVHN: the methods whose published code runs there (module docstring). Fair-ARD
# and ABSLD: CIFAR-10 with ResNet-18, their scripts' one setting (Fair-ARD.py:46-48; zhaoshiji123/ABSLD @7407c3a
# resnet18_absld_cifar10.py, whose teacher is TRADES' WRN-34-10, :61-62 `model_cifar_wrn.pt`, RobustBench's
# Zhang2019Theoretically: our paper teacher; recipe RECIPES['absld']).
# DGAD: main.py:180-183 (students mobilenetV2, resnet18), :206-245 (teachers on CIFAR-10 and CIFAR-100 only).
# CIARD: CIARD.py:67 trains MobileNetV2 (resnet18 the commented alternative) on CIFAR-10; the paper adds CIFAR-100.
METHODS_OF = {"resnet18_cifar10": METHODS + tuple(FAIR) + ("absld", "saad", "dgad", "ciard"),
              "mobilenet_v2_cifar10": ("mmard", "adaad", "adaiad", "igdm", "dgad", "ciard"),
              "resnet18_cifar100": METHODS + ("dgad", "ciard"),
              "preact_resnet18_tiny_imagenet": ("adaad", "igdm", "saad"),
              "resnet18_tiny_imagenet": ("peeraid",), "wrn34_10_tiny_imagenet": ("peeraid",),
              "resnet18_svhn": ("adaad", "igdm", "saad")}
TEACHER = {("cifar10", m): "ltd_wrn34_20" for m in ("adaad", "adaiad", "igdm", "dgad")}
TEACHER.update({("cifar100", m): "ltd_wrn34_10" for m in ("adaad", "adaiad", "igdm", "dgad")})
TEACHER.update({("tiny_imagenet", m): "tiny_linf_wrn28-10" for m in ("adaad", "igdm", "saad")})
TEACHER.update({("svhn", m): "svhn_linf_wrn28-10" for m in ("adaad", "igdm", "saad")})
TEACHER[("cifar10", "saad")] = "gowal_wrn28_10"  # saad main.sh:4
# The recipe of a (setting, method) run other than RECIPES[method] (the CIFAR rows use the method's own).
RECIPE = {("preact_resnet18_tiny_imagenet", m): "saad_scripts_tiny_imagenet" for m in ("adaad", "igdm")}
RECIPE.update({("resnet18_svhn", m): "saad_scripts_svhn" for m in ("adaad", "igdm")})
RECIPE[("preact_resnet18_tiny_imagenet", "saad")] = "saad_tiny_imagenet"
RECIPE[("resnet18_svhn", "saad")] = "saad_svhn"
RECIPE[("resnet18_tiny_imagenet", "peeraid")] = "peeraid_tiny_imagenet_resnet18"
RECIPE[("wrn34_10_tiny_imagenet", "peeraid")] = "peeraid_tiny_imagenet_wrn34_10"
# Runs following SAAD's adaad.py, whose only train-mode forward is S(x') (saad adaad.py:51-54), not AdaAD's
# S(x) then S(x') (AdaAD main.py:333-334): each needed forward once (`train_forwards='needed'`).
SAAD_ADAAD = {("preact_resnet18_tiny_imagenet", "adaad"), ("resnet18_svhn", "adaad")}

RUNS = tuple(f"method={m},setting={s}" for s in SETTINGS for m in METHODS_OF[s])
LAYOUT = {"rows": "method", "groups": "setting", "columns": ("clean", "pgd_s", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="adaad", setting="resnet18_cifar10", plugins=(), teacher="")
    if a["setting"] not in SETTINGS:
        raise ValueError(f"unknown setting {a['setting']!r}; known: {', '.join(SETTINGS)}")
    student, kwargs, dataset = SETTINGS[a["setting"]]
    if a["method"] in FAIR and a["setting"] not in {s for s, ms in METHODS_OF.items() if a["method"] in ms}:
        raise ValueError(f"{a['method']}: Fair-ARD's scripts run CIFAR-10 with ResNet-18 only (setting "
                         f"resnet18_cifar10)")
    method = FAIR.get(a["method"], a["method"])
    plugins = tuple(a["plugins"]) + (("fair",) if a["method"] in FAIR else ())
    teacher = a["teacher"] or TEACHER.get((dataset, method))
    c = config_lib.base_config(method, student, dataset, teacher, plugins=plugins)
    c.student.kwargs.update(kwargs)
    c = config_lib.apply_recipe(c, RECIPE.get((a["setting"], a["method"]), a["method"]))
    if a["method"] == "dgad" and student == "mobilenet_v2":
        c.method.dgad_form = "mobilenetv2_script"  # DGAD main.py:439-441, the script's MobileNetV2 branch
    if (a["setting"], a["method"]) in SAAD_ADAAD:
        c.method.train_forwards = "needed"
    # Evaluation as the papers report it: L-inf eps 8/255 on the whole test split (Tiny-ImageNet's 10,000 val
    # images, SVHN's 26,032), standard AutoAttack last (saad adaad.py:155-160; PeerAiD main.py:47, 1010-1011).
    c.eval.final_attacks = ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")
    if "igdm" in c.method.plugins or a["method"] in ("igdm", "saad"):  # saad.py:73: epoch / args.epochs
        c.method.igdm_epochs = float(c.num_epochs)  # the term reaches its full weight at the last epoch
    return c

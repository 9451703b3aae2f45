"""ImageNet distillation: a ResNet-18 or ResNet-50 student (torchvision layout) from a RobustBench ImageNet teacher,
with MMARD or RSLAD, on the teacher's published adversarial-training recipe, streamed from disk, on N hosts x M GPUs.

    --config=configs/imagenet.py:method=mmard,student=resnet18,hosts=4,gpus=8
    --config=configs/imagenet.py:method=rslad,student=resnet50,teacher=Salman2020Do_R50

No ARD paper reports ImageNet (docs/design.md, "ImageNet distillation"): the recipe is the teacher's. The default
teacher is Salman et al. 2020's WideResNet-50-2 (RobustBench Salman2020Do_50_2, L-inf 4/255: RobustBench/robustbench
@78fcc9e model_info/imagenet/Linf/Salman2020Do_50_2.json); `teacher=` takes any RobustBench ImageNet L-inf entry that
`mmard_jax.convert --dataset=imagenet` converts at 224x224 (TEACHERS: Salman2020Do_R50, Salman2020Do_R18, ...),
found in teachers/<name>_imagenet as the README's convert command writes it. Salman et al. trained their models
with MadryLab's robustness library (microsoft/robust-models-transfer @cea2c37 README.md:20); its ImageNet training
defaults are the recipe (RECIPE below, cited by line). `batch_size` is the global batch, split evenly over the
hosts x gpus devices of the mesh (each host feeds its gpus' share); a batch other than the recipe's 256 scales the
learning rate linearly (Goyal et al. 2017's rule; docs/design.md).
"""

from mmard_jax import config_lib

METHODS = ("mmard", "rslad")
STUDENTS = {"resnet18": "torchvision_resnet18", "resnet50": "torchvision_resnet50"}  # models/registry.py
DEFAULT_TEACHER = "Salman2020Do_50_2"
# The robust RobustBench ImageNet L-inf entries the converter covers (mmard_jax/interop/zoo.py) that take 224x224 inputs
# (Wong2020Fast is evaluated at 288, Standard_R50 is not adversarially trained).
TEACHERS = ("Salman2020Do_50_2", "Salman2020Do_R50", "Salman2020Do_R18", "Engstrom2019Robustness",
            "Chen2024Data_WRN_50_2")
# RobustBench's ImageNet protocol (robustbench/data.py:146-153: at most 5000 validation images, 'Res256Crop224';
# model_info/imagenet/Linf/*.json "eps": "4/255"): mmard_jax.data.eval_stream / eval_transforms.
EVAL_EXAMPLES = 5000
EPS = 4 / 255
# The teacher's recipe: MadryLab/robustness @a954124 robustness/defaults.py:26-31 (ImageNet: 200 epochs, batch 256,
# weight decay 1e-4, the lr x `step_lr_gamma` every 50 epochs), :71 (lr 0.1), :73 (momentum 0.9), :75 (gamma 0.1),
# train.py:106-107 + :374 (StepLR stepped once per epoch: x0.1 from 0-based epochs 50, 100, 150), :92 (7 PGD steps);
# the step size has no default (:95, required): README.rst:125-126's rule, 2.5 * eps / steps. Augmentation
# data_augmentation.py:40-50: RandomResizedCrop(224) and a horizontal flip (the streamed pipeline's ImageNet
# augmentation), then ColorJitter(0.1) and PCA lighting (0.05), not applied here (docs/design.md).
RECIPE = {"num_epochs": 200, "batch_size": 256, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
          "boundaries": (50, 100, 150), "decay": 0.1, "steps": 7, "step_size": 2.5 * EPS / 7}
EVAL_BATCH = 256  # per evaluation batch over the mesh (ResNet-50 attacks at 224x224: 500 outgrows one GPU's memory)

IMAGE_SIZE = 224  # the teachers' and RobustBench's input side
EVAL_CHUNK = 1000  # test images decoded and held at a time (224x224x3 uint8: 150 MB), attacked while the next decodes
SOURCES = {"tfds": "validation", "folder": "val"}  # where the training split is read from: its test split's name
# grain decoding processes per GPU, by method: the cores a GPU's step needs at 50% of an H100's peak (BENCHMARKS.md,
# "Input pipeline", 2026-12-07: MMARD ResNet-50 <- WRN-50-2 1.8, RSLAD ResNet-18 <- WRN-50-2 10.2), rounded up.
WORKERS_PER_GPU = {"mmard": 2, "rslad": 11}

RUNS = tuple(f"method={m},student={s}" for s in STUDENTS for m in METHODS)
LAYOUT = {"rows": "method", "groups": "student", "columns": ("clean", "pgd_s", "aa")}


def check_mesh(batch_size: int, hosts: int, gpus: int) -> int:
    """The per-device batch of a global batch on hosts x gpus devices; ValueError unless it divides evenly."""
    if hosts < 1 or gpus < 1:
        raise ValueError(f"hosts and gpus must be >= 1, got hosts={hosts}, gpus={gpus}")
    devices = hosts * gpus
    for name, size in (("batch_size", batch_size), ("the evaluation batch", EVAL_BATCH)):
        if size % devices:
            raise ValueError(f"{name} {size} does not divide over hosts x gpus = {devices} devices")
    return batch_size // devices


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="mmard", student="resnet18", teacher=DEFAULT_TEACHER, hosts=1, gpus=8,
                             batch_size=RECIPE["batch_size"], source="tfds", workers=-1)
    if a["method"] not in METHODS:
        raise ValueError(f"unknown method {a['method']!r}; known: {', '.join(METHODS)}")
    if a["student"] not in STUDENTS:
        raise ValueError(f"unknown student {a['student']!r}; known: {', '.join(STUDENTS)}")
    if a["teacher"] not in TEACHERS:
        raise ValueError(f"unknown teacher {a['teacher']!r}; known: {', '.join(TEACHERS)}")
    check_mesh(a["batch_size"], a["hosts"], a["gpus"])
    c = config_lib.base_config(a["method"], STUDENTS[a["student"]], "imagenet")
    c.teacher.checkpoint = f"teachers/{a['teacher']}_imagenet"
    if a["source"] not in SOURCES:
        raise ValueError(f"unknown source {a['source']!r}; known: {', '.join(SOURCES)}")
    # 1.28M JPEGs read from disk while training (input_pipeline): a prepared tfds imagenet2012 (array_record) or the
    # usual folder tree (data_dir/train/<wnid>/*.JPEG, data_dir/val/<wnid>/*.JPEG); the random-resized crop at 224
    # and its evaluation view (resize 256, centre crop 224); the test split evaluated EVAL_CHUNK images at a time.
    c.dataset.update(pipeline="stream", source=a["source"], augment="random_resized_crop", image_size=IMAGE_SIZE,
                     test_split=SOURCES[a["source"]], crop_padding=0,
                     workers=a["workers"] if a["workers"] >= 0 else WORKERS_PER_GPU[a["method"]] * a["gpus"])
    c.num_epochs = RECIPE["num_epochs"]
    c.batch_size = a["batch_size"]
    c.optim.update(lr=RECIPE["lr"] * a["batch_size"] / RECIPE["batch_size"], momentum=RECIPE["momentum"],
                   weight_decay=RECIPE["weight_decay"], schedule="piecewise", per_epoch=True,
                   boundaries=RECIPE["boundaries"], decay=RECIPE["decay"])
    c.attack.update(norm="Linf", eps=EPS, steps=RECIPE["steps"], step_size=RECIPE["step_size"])
    if c.method.get("kl_class_mean"):  # RSLAD: its KL is a mean over batch x classes (rslad_loss.py), which the
        # published scripts scale by classes / 10 (1 on CIFAR-10, 10 on CIFAR-100: methods.DATASET_HPARAMS): 100 here
        c.method.kl_scale = config_lib.NUM_CLASSES["imagenet"] / 10
    c.eval.update(norm="Linf", eps=EPS, n_examples=EVAL_EXAMPLES, batch_size=EVAL_BATCH, chunk_size=EVAL_CHUNK,
                  final_attacks=("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa"))
    return c

"""How fast each pipeline trains, measured against its own model's ceiling and against a plain reference.

For each of the five scripts, in one run (issue 9):
  (a) ceiling: the model's own training step (forward, loss, backward, optimizer step) in bfloat16 autocast on
      tensors already on the device, with the script's batch and input shape: what the network alone allows;
  (b) real:    the script's own training loop, data loading and augmentation included: its `train_one_epoch`
      timed inside its own stages (`load_data`, `build_model`, `fit`, as its cells run them) on a synthetic
      sample with 8 times the usual cases (written to a temporary folder; `--data-dir data` for the real
      datasets), over several epochs, the first left out (cuDNN autotuning, worker start-up, caching);
  (c) plain:   the same model and loss trained the plain way of the original seeds and the MONAI tutorials:
      float32, a Dataset that reads and preprocesses every item from disk each time, a torch DataLoader;
and inference: images/s of the 2D models on batches, volumes/s of sliding-window inference for the 3D ones.
It reports samples/s (images, or 3D crops), peak GPU memory, and the ratios b/a (does data starve the GPU?) and
b/c (what the caching, mixed precision and device-side augmentation bring), against the targets of issue 9:
b/a >= 0.85 for every pipeline, b/c >= 3 for the 3D ones and >= 2 for the 2D ones.

    python benchmarks/gpu_bench.py                      # all five on the GPU: JSON + a Markdown table
    python benchmarks/gpu_bench.py --pipelines nerve,covid --steps 50 --epochs 4
    python benchmarks/gpu_bench.py --tiny               # a smoke check of the harness on any CPU (seconds)

Results go to output/benchmarks/gpu_bench.json (and the table to stdout); the README's "Speed" section holds the
table of the last run on a GPU. `--tiny` shrinks every shape, batch and epoch so the whole harness runs on a CPU
in a couple of minutes: its figures say nothing about speed, only that each measurement runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts import their shared modules (dice.py, ...) from the repository root

PIPELINES = ("lung", "nerve", "pneumonia", "covid", "pleural")
SCRIPTS = {
    "lung": "lung_xray_unet",
    "nerve": "nerve_ultrasound_segmentation",
    "pneumonia": "pneumonia_detection",
    "covid": "covid_ct_segmentation",
    "pleural": "pleural_effusion_3d",
}
TARGET_B_OVER_A = 0.85
TARGET_B_OVER_C = {"lung": 2.0, "nerve": 2.0, "pneumonia": 2.0, "covid": 3.0, "pleural": 3.0}


# %% Timing


def synchronize(device: torch.device) -> None:
    """Wait for the GPU: its work is queued, so a clock read without this measures only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of `step()` over `steps` calls, after `warmup` calls (cuDNN autotuning, allocator)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast (no gradient scaling needed: bfloat16 has float32's range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# %% The scripts


def load_script(name: str, quick: bool):
    """A script as a module (its `__main__` cell does not run), with QUICK read as given."""
    previous = os.environ.get("QUICK")
    os.environ["QUICK"] = "1" if quick else "0"
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("QUICK", None)
        else:
            os.environ["QUICK"] = previous
    return module


def batch_length(batch) -> int:
    """Samples in a batch as the scripts' loaders give them: a dict of tensors (MONAI), (images, masks) tensors,
    or (images, targets) tuples (detection)."""
    first = batch["image"] if isinstance(batch, dict) else batch[0]
    return len(first)


class CountingLoader:
    """A loader that counts the samples it hands out; everything else is the wrapped loader's."""

    def __init__(self, loader):
        self.loader, self.samples = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.samples += batch_length(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


@dataclass
class EpochTimes:
    """What the timed training epochs of a real run saw: seconds and samples per epoch."""

    seconds: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)


def time_function_epochs(module, device: torch.device, times: EpochTimes):
    """Replace module.train_one_epoch(model, loader, ...) by a timed one that counts the loader's samples."""
    original = module.train_one_epoch

    @functools.wraps(original)
    def timed(model, loader, *args, **kwargs):
        counting = CountingLoader(loader)
        synchronize(device)
        start = time.perf_counter()
        result = original(model, counting, *args, **kwargs)
        synchronize(device)
        times.seconds.append(time.perf_counter() - start)
        times.samples.append(counting.samples)
        return result

    module.train_one_epoch = timed


def time_trainer_epochs(module, device: torch.device, times: EpochTimes):
    """The lung script's Trainer.train_one_epoch(self, epoch) reads self.train_loader: count through it."""
    original = module.Trainer.train_one_epoch

    @functools.wraps(original)
    def timed(self, epoch):
        loader, self.train_loader = self.train_loader, CountingLoader(self.train_loader)
        synchronize(device)
        start = time.perf_counter()
        try:
            return original(self, epoch)
        finally:
            synchronize(device)
            times.seconds.append(time.perf_counter() - start)
            times.samples.append(self.train_loader.samples)
            self.train_loader = loader

    module.Trainer.train_one_epoch = timed


# %% The five pipelines: data, configuration, a batch for the ceiling, a plain dataset


@contextlib.contextmanager
def larger_sample(scale: int):
    """The synthetic sample with `scale` times the cases (subjects, patients, films, volumes) of the one in
    sample_data.py, so that an epoch of the real loop is long enough to be steady (the nerve sample's 50 frames
    are less than one default batch of 128). The counts are module constants read when a dataset is written."""
    import sample_data

    saved = {name: getattr(sample_data, name) for name in SAMPLE_COUNTS}
    sample_data.NERVE_SUBJECTS *= scale
    sample_data.RSNA_CLASSES = {label: n * scale for label, n in saved["RSNA_CLASSES"].items()}
    sample_data.MONTGOMERY_IMAGES = min(saved["MONTGOMERY_IMAGES"] * scale, 100)  # ids are drawn from 1..104
    sample_data.COVID_CASES = saved["COVID_CASES"] | {"Train": saved["COVID_CASES"]["Train"] * scale}
    sample_data.PLEURAL_CASES *= scale
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(sample_data, name, value)


SAMPLE_COUNTS = ("NERVE_SUBJECTS", "RSNA_CLASSES", "MONTGOMERY_IMAGES", "COVID_CASES", "PLEURAL_CASES")


@dataclass
class Pipeline:
    name: str
    module: object
    cfg: object  # the script's Config, as the real loop runs it
    dims: int  # 2 or 3


def configure(name: str, module, tiny: bool, data_dir: Path, output_dir: Path, epochs: int):
    """The script's own default configuration (QUICK=0), with outputs kept out of the repository; `tiny`: the
    quick configuration, shrunk further for a CPU."""
    cfg = replace(module.Config(), data_dir=data_dir, output_dir=output_dir / name, images_dir=output_dir / "Images")
    cfg = replace(cfg, max_epochs=epochs)
    if name == "covid":
        cfg = replace(cfg, val_interval=epochs, tta_flips=False, max_infer_cases=1)  # validate once, at the end
    if name == "pleural":
        cfg = replace(cfg, val_interval=epochs)
    if name in ("nerve",):
        cfg = replace(cfg, max_test_images=8)
    if tiny:
        shrink = {
            "lung": dict(image_size=32, depth=2, batch_size=2),
            "nerve": dict(image_size=(32, 48), batch_size=4, max_test_images=2),
            "pneumonia": dict(image_size=64, patients_per_class=3, batch_size=2, rpn_proposals_train=50,
                              rpn_proposals_test=50, box_batch_size_per_image=16, precise_bn_batches=1),
            "covid": dict(pixdim=(6.0, 6.0, 6.0), roi_size=(32, 32, 16), features=(4, 4, 8, 8, 16, 4), max_cases=4,
                          num_samples=1, batch_size=1),
            "pleural": dict(roi_size=(16, 16, 8), channels=(4, 8), strides=(2,), num_res_units=1, max_cases=4,
                            samples_per_volume=1, batch_size=1),
        }[name]  # fmt: skip
        cfg = replace(cfg, **shrink)
    return cfg


def ceiling_batch(pipeline: Pipeline, device: torch.device):
    """(inputs, targets) on the device, shaped as one training step of the script; random, with some foreground."""
    cfg, generator = pipeline.cfg, torch.Generator(device="cpu").manual_seed(0)
    if pipeline.name == "pneumonia":
        size = cfg.image_size
        images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(cfg.batch_size)]
        box = torch.tensor([[size * 0.2, size * 0.3, size * 0.45, size * 0.7]], device=device)
        targets = [{"boxes": box, "labels": torch.ones(1, dtype=torch.int64, device=device)} for _ in images]
        return images, targets
    if pipeline.name == "lung":
        shape = (cfg.batch_size, 1, cfg.image_size, cfg.image_size)
    elif pipeline.name == "nerve":
        shape = (cfg.batch_size, 1, *cfg.image_size)
    elif pipeline.name == "covid":
        shape = (cfg.batch_size * cfg.num_samples, 1, *cfg.roi_size)
    else:
        shape = (cfg.batch_size * cfg.samples_per_volume, 1, *cfg.roi_size)
    image = torch.rand(shape, generator=generator).to(device)
    label = (torch.rand(shape, generator=generator) > 0.9).float().to(device)
    return image, label


def build_training(pipeline: Pipeline, device: torch.device):
    """(model, loss_fn or None for detection, optimizer) as the script builds them."""
    module, cfg = pipeline.module, pipeline.cfg
    with contextlib.redirect_stdout(io.StringIO()):  # "COCO weights not found ..." once is enough
        model = module.build_model(cfg)
    if pipeline.name == "pneumonia":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return model.to(device), None, optimizer
    loss_fn = {
        "lung": lambda: module.LungLoss(cfg.loss),
        "nerve": lambda: module.DiceBCELoss(cfg.bce_weight),
        "covid": lambda: module.build_loss(),
        "pleural": lambda: module.DiceBCELoss(cfg.bce_weight, cfg.pos_weight),
    }[pipeline.name]()
    model = model.to(device)
    return model, loss_fn.to(device), torch.optim.Adam(model.parameters(), lr=cfg.lr)


def train_step(model, loss_fn, optimizer, inputs, targets, device, bf16: bool) -> None:
    """One optimizer step with no read-back to the CPU (nothing in it waits for the GPU)."""
    with autocast(device, enabled=bf16):
        if loss_fn is None:  # detection: the model returns its losses
            loss = sum(model(inputs, targets).values())
        else:
            loss = loss_fn(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure_ceiling(pipeline: Pipeline, device: torch.device, steps: int, warmup: int) -> dict:
    """(a): the training step alone, in bfloat16, on a batch already on the device."""
    torch.manual_seed(0)
    model, loss_fn, optimizer = build_training(pipeline, device)
    model.train()
    inputs, targets = ceiling_batch(pipeline, device)
    batch = len(inputs)
    reset_peak_memory(device)
    seconds = timed_steps(lambda: train_step(model, loss_fn, optimizer, inputs, targets, device, True), steps, warmup,
                          device)  # fmt: skip
    result = {"samples_per_s": batch / seconds, "batch": batch, "peak_gib": peak_memory_gib(device)}
    result["inference"] = measure_inference(pipeline, model, inputs, device, steps, warmup)
    return result


def measure_inference(pipeline: Pipeline, model, inputs, device: torch.device, steps: int, warmup: int) -> dict:
    """2D: images/s of the model in eval mode on a training-sized batch. 3D: volumes/s of the script's own
    sliding-window inference on a volume of a typical size on the network's grid (random: only speed counts)."""
    module, cfg = pipeline.module, pipeline.cfg
    model.eval()
    with torch.no_grad():
        if pipeline.dims == 2:

            def forward():
                with autocast(device):
                    model(inputs)

            seconds = timed_steps(forward, steps, warmup, device)
            return {"images_per_s": len(inputs) / seconds}
        tiny = cfg.roi_size[0] <= 32
        if pipeline.name == "covid":  # a 512x512 CT at ~0.7 mm and 5 mm slices, at 1.25 x 1.25 x 5 mm
            shape = (64, 64, 24) if tiny else (288, 288, 64)
            volume = torch.rand(1, *shape)
            run = functools.partial(module.predict_probability, model, volume, cfg)  # on the script's DEVICE
        else:  # a NSCLC-Radiomics CT (512x512, 3 mm slices) halved in-plane and cropped to the body
            shape = (48, 48, 24) if tiny else (224, 192, 112)
            volume = torch.rand(1, *shape)
            run = functools.partial(module.predict_logits, model, volume, cfg)  # on the script's DEVICE
        seconds = timed_steps(run, max(2, steps // 10), 1, device)
        return {"volumes_per_s": 1 / seconds, "volume_shape": list(shape)}


def train_with_the_stages(pipeline: Pipeline) -> None:
    """The script's Data, Model and Train stages, as its cells run them (lung's Train cell: its Trainer)."""
    module, cfg = pipeline.module, pipeline.cfg
    data = module.load_data(cfg)
    model = module.build_model(cfg)
    if pipeline.name == "lung":
        module.Trainer(cfg, data, model).fit()
    else:
        module.fit(cfg, data, model)


def measure_real(pipeline: Pipeline, device: torch.device) -> dict:
    """(b): the script's stages for cfg.max_epochs epochs, its train_one_epoch timed; the first epoch left out."""
    module, times = pipeline.module, EpochTimes()
    if pipeline.name == "lung":
        time_trainer_epochs(module, device, times)
    else:
        time_function_epochs(module, device, times)
    reset_peak_memory(device)
    with contextlib.redirect_stdout(io.StringIO()):
        train_with_the_stages(pipeline)
    steady = slice(1, None) if len(times.seconds) > 1 else slice(None)
    samples, seconds = sum(times.samples[steady]), sum(times.seconds[steady])
    return {
        "samples_per_s": samples / seconds,
        "epochs_timed": len(times.seconds[steady]),
        "samples_timed": samples,
        "first_epoch_s": times.seconds[0],
        "peak_gib": peak_memory_gib(device),
    }


# %% (c) the plain reference: read everything from disk for every item, float32


class PlainDataset(torch.utils.data.Dataset):
    """Items read from disk on every access by `load(item)`, as the original seeds did."""

    def __init__(self, items: list, load):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.load(self.items[index])


def plain_loader(pipeline: Pipeline, workers: int) -> torch.utils.data.DataLoader:
    """The plain pipeline's loader, from the same files the script reads."""
    from monai.data import list_data_collate  # MONAI's random crops return a list of crops per item

    module, cfg = pipeline.module, pipeline.cfg
    collate = None
    if pipeline.name == "lung":
        with contextlib.redirect_stdout(io.StringIO()):
            train = module.load_data(cfg).train  # each case names its prepared PNGs, read again below

        def load(case):
            return module.read_prepared(case["image"], cfg.image_size), module.read_prepared(
                case["seg"], cfg.image_size, is_mask=True
            )

        items = train
    elif pipeline.name == "nerve":
        from PIL import Image

        train_dir = find(module, cfg, "ultrasound-nerve-segmentation") / "train"  # the TIFFs, decoded every time
        items = [(p.with_name(p.name.replace("_mask", "")), p) for p in sorted(train_dir.glob("*_mask.tif"))]

        def load(pair):
            image, mask = (np.asarray(Image.open(path).convert("L")) for path in pair)
            return (module.resize(image, cfg.image_size).float() / 255,
                    module.resize((mask > 0).astype(np.uint8), cfg.image_size, mask=True).float())  # fmt: skip

    elif pipeline.name == "pneumonia":
        root = find(module, cfg, "rsna-pneumonia-detection-challenge")
        items = module.sample_patients(module.read_patients(root), cfg.patients_per_class, cfg.seed)
        transforms = module.build_transforms(cfg, train=True)
        skipped = new_skipped("patient")

        def load(patient):
            item = module.load_patients([patient], cfg.image_size, skipped, progress=False)[0]
            return module.DetectionDataset([item], transforms)[0]

        collate = module.collate
    elif pipeline.name == "covid":
        import monai.data

        root = find(module, cfg, "COVID-19-20_v2")
        with contextlib.redirect_stdout(io.StringIO()):
            items = module.find_covid_cases(root / "Train", new_skipped("file"))[: cfg.max_cases]
        dataset = monai.data.Dataset(items, module.build_transforms(cfg, "train"))  # MONAI's uncached Dataset
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                                           collate_fn=list_data_collate)  # fmt: skip
    else:  # pleural
        root = find(module, cfg, "pleural_effusion")
        with contextlib.redirect_stdout(io.StringIO()):
            items = module.find_cases(root, cfg.reviewer, new_skipped("case"))[: cfg.max_cases]
        transforms = module.build_transforms(cfg)

        def load(case):
            hu, _, mask, _ = module.read_case(case, cfg.mask_orientation)  # the series and the mask, read each time
            prep = module.preprocess(hu, cfg)
            return transforms({"image": prep["image"].float(), "label": module.downsample_mask(mask, prep, cfg)})

        collate = list_data_collate
    return torch.utils.data.DataLoader(PlainDataset(items, load), batch_size=cfg.batch_size, shuffle=True,
                                       num_workers=workers, collate_fn=collate, drop_last=True)  # fmt: skip


def find(module, cfg, name: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        return module.find_dataset(name, Path(cfg.data_dir)).root


def new_skipped(noun: str):
    """A collector of skipped inputs (named, skipped and counted) as the scripts use."""
    from data_cleaning import Skipped

    return Skipped(noun)


def measure_plain(pipeline: Pipeline, device: torch.device, steps: int, warmup: int, workers: int) -> dict:
    """(c): float32, items read from disk every time, a torch DataLoader; `steps` steps after `warmup`."""
    torch.manual_seed(0)
    model, loss_fn, optimizer = build_training(pipeline, device)
    model.train()
    loader = plain_loader(pipeline, workers)
    if len(loader) == 0:
        raise ValueError(f"{pipeline.name}: too few training items for one batch of {pipeline.cfg.batch_size}")

    def batches():
        while True:
            yield from loader

    stream = batches()

    def step() -> int:
        batch = next(stream)
        if pipeline.name == "pneumonia":
            images, targets = batch
            inputs = [img.to(device) for img in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        elif isinstance(batch, dict):
            inputs, targets = batch["image"].to(device).float(), batch["label"].to(device).float()
        else:
            inputs, targets = batch[0].to(device), batch[1].to(device)
        train_step(model, loss_fn, optimizer, inputs, targets, device, bf16=False)
        return len(inputs)

    for _ in range(warmup):
        step()
    reset_peak_memory(device)
    synchronize(device)
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        samples += step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples / seconds, "samples_timed": samples, "workers": workers,
            "peak_gib": peak_memory_gib(device)}  # fmt: skip


# %% Run


def run(
    names: list[str],
    tiny: bool,
    steps: int,
    warmup: int,
    epochs: int,
    data_dir: Path | None,
    workers: int,
    sample_scale: int = 1,
    json_path: Path | None = None,
) -> dict:
    """Measure each pipeline of `names`; the report so far is written to `json_path` after each one. A pipeline that
    fails (out of GPU memory, a data problem) is recorded with its error and the others still run: a GPU's time is
    too dear to lose a whole run to one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the scripts set it
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "tiny": tiny,
        "steps": steps,
        "epochs": epochs,
        "data": "synthetic sample" + (f" x {sample_scale}" if sample_scale > 1 else "")
        if data_dir is None
        else str(data_dir),
        "pipelines": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as scratch, larger_sample(sample_scale):
        # No data folder given: the scripts write their synthetic sample into the scratch folder's sample/.
        data_dir = Path(scratch) / "data" if data_dir is None else data_dir
        data_dir.mkdir(parents=True, exist_ok=True)  # the benchmark's own folder: the scripts ask for an existing one
        for name in names:
            try:
                report["pipelines"][name] = measure_pipeline(name, tiny, steps, warmup, epochs, data_dir, workers,
                                                             Path(scratch) / "output", device)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - recorded, and the next pipeline measured
                message = f"{type(err).__name__}: {err}".splitlines()[0]
                print(f"{name}: FAILED ({message})", file=sys.stderr)
                report["pipelines"][name] = {"error": message}
            finally:
                sys.modules.pop(SCRIPTS[name], None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if json_path is not None:
                write_json(report, json_path)
    return report


def measure_pipeline(name: str, tiny: bool, steps: int, warmup: int, epochs: int, data_dir: Path, workers: int,
                     output_dir: Path, device: torch.device) -> dict:  # fmt: skip
    """(a), (b), (c) and inference of one pipeline, with the ratios and whether they meet the targets."""
    module = load_script(SCRIPTS[name], quick=tiny)
    cfg = configure(name, module, tiny, data_dir, output_dir, epochs)
    pipeline = Pipeline(name, module, cfg, 3 if name in ("covid", "pleural") else 2)
    print(f"{name}: ceiling ...", file=sys.stderr)
    ceiling = measure_ceiling(pipeline, device, steps, warmup)
    print(f"{name}: real loop ({epochs} epochs of {SCRIPTS[name]}'s stages) ...", file=sys.stderr)
    real = measure_real(pipeline, device)
    print(f"{name}: plain reference ...", file=sys.stderr)
    plain = measure_plain(pipeline, device, max(2, steps // 2), min(warmup, 2), workers)
    b_over_a = real["samples_per_s"] / ceiling["samples_per_s"]
    b_over_c = real["samples_per_s"] / plain["samples_per_s"]
    return {
        "ceiling": ceiling,
        "real": real,
        "plain": plain,
        "b_over_a": b_over_a,
        "b_over_c": b_over_c,
        "targets": {"b_over_a": TARGET_B_OVER_A, "b_over_c": TARGET_B_OVER_C[name]},
        "meets_targets": b_over_a >= TARGET_B_OVER_A and b_over_c >= TARGET_B_OVER_C[name],
    }


def write_json(report: dict, path: Path) -> None:
    """The report as JSON, whole: written beside, then renamed over the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, path)


def table(report: dict) -> str:
    """The README's table: one row per pipeline."""
    rows = [
        f"Device: {report['device']}, torch {report['torch']}"
        + (" (--tiny: not a measurement)" if report["tiny"] else ""),
        "",
        "| pipeline | (a) ceiling, samples/s | (b) real loop | (c) plain | b/a | b/c | inference | peak GiB (a/b/c) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in report["pipelines"].items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:100]} | | | | | | |")
            continue
        inference = r["ceiling"]["inference"]
        inf = (f"{inference['images_per_s']:.1f} images/s" if "images_per_s" in inference
               else f"{inference['volumes_per_s']:.2f} volumes/s")  # fmt: skip
        peaks = "/".join(
            "-" if r[k]["peak_gib"] is None else f"{r[k]['peak_gib']:.1f}" for k in ("ceiling", "real", "plain")
        )
        rows.append(
            f"| {name} | {r['ceiling']['samples_per_s']:.1f} | {r['real']['samples_per_s']:.1f} | "
            f"{r['plain']['samples_per_s']:.1f} | {r['b_over_a']:.2f} | {r['b_over_c']:.2f} | {inf} | {peaks} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated, of " + ", ".join(PIPELINES))
    parser.add_argument("--steps", type=int, default=30, help="timed steps for (a) and (c)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the real loop; the first is not counted")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the plain reference")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="as the scripts' Config.data_dir; default: a "
        "fresh synthetic sample in a temporary folder (`--data-dir data` for the real datasets)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "output" / "benchmarks" / "gpu_bench.json")
    parser.add_argument("--sample-scale", type=int, default=8, help="times the cases of the synthetic sample")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and steps: checks the harness on a CPU")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipeline(s) {', '.join(unknown)}: choose from {', '.join(PIPELINES)}")
    if args.tiny:
        args.steps, args.warmup, args.epochs, args.workers, args.sample_scale = min(args.steps, 2), 1, 2, 0, 1
    report = run(names, args.tiny, args.steps, args.warmup, args.epochs, args.data_dir, args.workers,
                 sample_scale=args.sample_scale, json_path=args.json)  # fmt: skip
    print(table(report))
    print(f"\nJSON: {args.json}")
    return report


if __name__ == "__main__":
    failed = [name for name, r in main()["pipelines"].items() if "error" in r]
    sys.exit(f"Failed: {', '.join(failed)} (the error of each is in the table and the JSON)" if failed else 0)

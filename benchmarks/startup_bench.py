"""Start-up at full scale (issue 18): each script's time to its first training batch, today's way (no disk cache),
cold (the disk cache empty: built now, on every core) and warm (the next run: read back), with the scripts' own code.

It writes full-size synthetic stand-ins in each dataset's own layout into a scratch folder: 1024x1024 JPEG DICOMs
as RSNA's, 580x420 TIFF frames and masks as the nerve challenge's, 4020x4892 16-bit PNG films with both lung masks
as Montgomery's, 512x512x120 CT NIfTI volumes with their lesion masks as COVID-19-20's, 512x512xN DICOM series with
PleThora masks as NSCLC-Radiomics'. Then, for each pipeline and each way, in a fresh process (no import, no decoded
array shared between the ways; the operating system's page cache is, as on a user's machine):

- pneumonia: `load_patients` (decode and resize every radiograph), then the first batch of its DetectionDataset;
- nerve: `decode_frames` (frame and mask decoded, resized, packed, the near-duplicate signature);
- lung: `prepare_data` (segmentation/ written, or reused on the warm run) and the films read at `image_size`;
- COVID: `preprocessed` (MONAI's load, orient, resample, window, pad; PersistentDataset on disk, or CacheDataset
  with one worker today), then the first batch of random crops;
- pleural: `load_cases` (series read, mask placed, block-meaned, cropped, windowed).

"today" is each script's `cache=False`, which is what every script did before the disk cache (lung: the same on one
core, as its preparation was). Each way reports seconds, seconds per case, peak RSS of the process and of its
workers, and what the cache read back and built. Under torchrun with 2 processes, pneumonia is also measured one
epoch's reads long (every image of the process's shard through the transforms, no model), then a second epoch's:
peak RSS, PSS (the resident memory with each shared page divided among the processes sharing it) and private memory
(the pages no other process maps) per process, today, cold and warm, on --torchrun-count radiographs (copies of the
stand-ins beyond --counts). It extrapolates to the full datasets, writes JSON (--json) and prints Markdown tables.

    python benchmarks/startup_bench.py                          # about 5 minutes on 2 cores
    python benchmarks/startup_bench.py --kinds nerve --counts 40 --json out.json
    python benchmarks/startup_bench.py --kinds pneumonia --torchrun-count 26684    # RSNA's full count: 12 GB of disk,
                                                                # 15 GB of memory, 15 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPTS = {"pneumonia": "pneumonia_detection", "nerve": "nerve_ultrasound_segmentation", "lung": "lung_xray_unet",
           "covid": "covid_ct_segmentation", "pleural": "pleural_effusion_3d"}  # fmt: skip
COUNTS = {"pneumonia": 1000, "nerve": 500, "lung": 24, "covid": 12, "pleural": 8}  # what fits this machine
FULL_COUNTS = {"pneumonia": 26_684, "nerve": 5_635, "lung": 138, "covid": 199, "pleural": 78}
SOURCE = {"pneumonia": "1024x1024 JPEG DICOM", "nerve": "580x420 TIFF + mask", "lung": "4020x4892 16-bit PNG + 2 masks",
          "covid": "512x512x120 CT + mask NIfTI", "pleural": "512x512x100 DICOM series + mask"}  # fmt: skip
SERIES_SLICES = 100


def load_script(kind: str):
    """The script as a module with its full (not quick) configuration; its __main__ cells do not run."""
    os.environ["QUICK"] = "0"
    spec = importlib.util.spec_from_file_location(SCRIPTS[kind], REPO / f"{SCRIPTS[kind]}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SCRIPTS[kind]] = module  # the forked workers find the preparation functions by name
    spec.loader.exec_module(module)
    return module


# %% Full-size stand-ins, each in its dataset's layout


def write_sources(kind: str, root: Path, count: int) -> None:
    """`count` full-size cases of `kind` under `root` (smooth noise: it compresses like an image, not a constant)."""
    import nibabel as nib
    from PIL import Image

    import sample_data as sd

    rng = np.random.default_rng(0)
    for i in range(count):
        if kind == "pneumonia":
            pixels = (sd._smooth_noise(rng, (1024, 1024), (16, 16)) * 200 + 20).astype(np.uint8)
            tags = {"SOPInstanceUID": sd._dicom_uid(4, i, 1), "StudyInstanceUID": sd._dicom_uid(2, i, 1),
                    "SeriesInstanceUID": sd._dicom_uid(3, i, 1), "PatientID": f"p{i}", "PatientName": f"p{i}",
                    "PatientSex": "M", "PatientAge": "51", "ViewPosition": "PA"}  # fmt: skip
            (root / "train").mkdir(parents=True, exist_ok=True)
            sd._write_jpeg_dicom(root / "train" / f"p{i:05d}.dcm", pixels, tags)
        elif kind == "nerve":
            (root / "train").mkdir(parents=True, exist_ok=True)
            pixels = (sd._smooth_noise(rng, (420, 580), (12, 12)) * 255).astype(np.uint8)
            sd._save_tiff(root / "train" / f"1_{i + 1}.tif", pixels)
            mask = np.zeros((420, 580), np.uint8)
            mask[150:250, 200:330] = 255 if i % 2 else 0
            sd._save_tiff(root / "train" / f"1_{i + 1}_mask.tif", mask)
        elif kind == "lung":
            name = f"MCUCXR_{i:04d}_{i % 2}.png"
            film = (sd._smooth_noise(rng, (4892, 4020), (20, 20)) * 4000).astype(np.uint16)
            for folder, pixels in (("CXR_png", film), ("ManualMask/leftMask", None), ("ManualMask/rightMask", None)):
                (root / folder).mkdir(parents=True, exist_ok=True)
                if pixels is None:  # a lung: a rectangle on its side of the film, 0/255
                    pixels = np.zeros((4892, 4020), np.uint8)
                    columns = slice(600, 1900) if "left" in folder else slice(2100, 3400)
                    pixels[800:3800, columns] = 255
                Image.fromarray(pixels).save(root / folder / name)
        elif kind == "covid":  # int16 HU, 0.7 x 0.7 x 2.5 mm, a lesion block
            hu = (sd._smooth_noise(rng, (512, 512), (16, 16)) * 1500 - 1000).astype(np.int16)
            volume = np.repeat(hu[:, :, None], 120, axis=2)
            seg = np.zeros(volume.shape, np.uint8)
            seg[150:250, 200:300, 40:80] = 1
            affine = np.diag([0.7, 0.7, 2.5, 1.0])
            (root / "Train").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, affine), root / "Train" / f"volume-covid19-A-{i:04d}_ct.nii.gz")
            nib.save(nib.Nifti1Image(seg, affine), root / "Train" / f"volume-covid19-A-{i:04d}_seg.nii.gz")
        else:  # pleural: the sample's phantom at full size, in TCIA's and PleThora's layouts
            patient, shape, spacing = f"LUNG1-{i + 1:03d}", (512, 512, SERIES_SLICES), (0.98, 0.98, 3.0)
            hu, lungs = sd._ct_phantom(shape, spacing, rng)
            effusion = sd._add_effusion(hu, lungs, spacing, rng)
            corner = sd._scanner_corner(shape, spacing, rng)
            sd._write_ct_series(root / "NSCLC-Radiomics" / patient, patient, sd._add_noise(hu, rng), spacing, corner,
                                rng)  # fmt: skip
            stored, affine = sd._flip(effusion.astype(np.float32), sd._ras_affine(spacing, corner), axes=(1,))
            sd._save_nifti(root / "Effusions" / patient / f"{patient}_effusion_first_reviewer.nii.gz", stored, affine)


# %% One way of starting one pipeline, in this (fresh) process


def start(kind: str, mode: str, root: Path, cache_dir: Path, count: int) -> dict:
    """The script's data path up to its first training batch (`count` cases): seconds, and what the disk cache read
    and built."""
    from data_cleaning import Skipped

    module = load_script(kind)
    cfg = replace(module.Config(), cache=mode != "today", cache_dir=cache_dir, data_dir=root.parent)
    out = io.StringIO()
    begin = time.perf_counter()
    with contextlib.redirect_stdout(out):
        if kind == "pneumonia":
            dataset, cache = pneumonia_dataset(module, cfg, root)
            next(iter(pneumonia_loader(module, cfg, dataset)))
        elif kind == "nerve":
            frames = [path for path in sorted((root / "train").glob("*.tif")) if not path.stem.endswith("_mask")]
            cases = [{"image": path, "mask": path.with_name(f"{path.stem}_mask.tif")} for path in frames]
            module.decode_frames(cases, cfg, Skipped("file"))
        elif kind == "lung":
            if mode == "today":  # before issue 18 the preparation ran on one core
                os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            prepared = module.prepare_data(cfg, root)
            train, val, _ = module.split_cases(prepared, cfg)
            module.decode(train + val, cfg.image_size)
        elif kind == "covid":
            from monai.data import DataLoader
            from monai.utils import first

            cases = [{"case": p.name[17:21], "image": str(p), "label": str(p).replace("_ct.", "_seg.")}
                     for p in sorted((root / "Train").glob("*_ct.nii.gz"))]  # fmt: skip
            transforms = module.build_transforms(cfg, "train")
            transforms.set_random_state(seed=0)
            dataset = module.preprocessed(cases, transforms, cfg, "train", say=True)
            first(DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=0))
        else:
            skipped = Skipped("case")
            module.load_cases(module.find_cases(root, "first", skipped), cfg, skipped)
    seconds = time.perf_counter() - begin
    said = out.getvalue()
    counts = re.search(r"Disk cache .*?: (\d+) \w+ (?:\w+ )?read back, (\d+)", said)
    read, built = (int(n) for n in counts.groups()) if counts else (0, 0)
    if kind == "pneumonia" and cache is not None:
        read, built = cache.read, cache.built
    if kind == "lung" and "Reusing the prepared cases" in said:
        read = count  # segmentation/ read as prepared: every film
    return {"seconds": seconds, "read": read, "built": built, "reused": "Reusing the prepared" in said,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}  # fmt: skip


def pneumonia_dataset(module, cfg, root: Path):
    """(DetectionDataset, its DiskCache or None): every radiograph of `root`, loaded as the script's Data cell does
    (no boxes: a start-up, not a training)."""
    import distributed
    from data_cleaning import Skipped

    patients = [
        {"patient_id": p.stem, "path": p, "boxes": np.zeros((0, 4))} for p in sorted((root / "train").iterdir())
    ]
    cache = module.radiograph_cache(cfg)
    with distributed.main_first():  # under torchrun process 0 builds the cache, as the script's Data cell does
        items = module.load_patients(patients, cfg.image_size, Skipped("radiograph"), progress=False, cache=cache)
    return module.DetectionDataset(items, module.build_transforms(cfg, True)), cache


def pneumonia_loader(module, cfg, dataset, sampler=None):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      collate_fn=module.collate)  # fmt: skip


def distributed_epoch(mode: str, root: Path, cache_dir: Path, report: Path) -> None:
    """Under torchrun: pneumonia's data loaded as the script loads it, then one epoch of this process's shard read
    through the transforms; peak RSS and PSS of this process into report/rank<N>.json."""
    import distributed

    distributed.setup()
    from torch.utils.data.distributed import DistributedSampler

    module = load_script("pneumonia")
    cfg = replace(module.Config(), cache=mode != "today", cache_dir=cache_dir, data_dir=root.parent)
    libraries = memory()  # torch and the rest, before any radiograph
    begin = time.perf_counter()
    dataset, _ = pneumonia_dataset(module, cfg, root)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    for _ in pneumonia_loader(module, cfg, dataset, sampler):
        pass
    seconds = time.perf_counter() - begin
    result = {"seconds": seconds, "radiographs": len(dataset), **measured_together(),
              **{f"libraries_{name}": value for name, value in libraries.items()}}  # fmt: skip
    sampler.set_epoch(1)  # another shard, drawn from every radiograph: a process now maps pages of both halves
    for _ in pneumonia_loader(module, cfg, dataset, sampler):
        pass
    result.update({f"epoch2_{name}": value for name, value in measured_together().items()})
    (report / f"rank{distributed.rank()}.json").write_text(json.dumps(result))


def measured_together() -> dict:
    """memory() once every process has got here, before any goes on: a page's share in PSS depends on how many
    processes map it at that moment (a process that has gone, or not yet read, shares none)."""
    import torch.distributed as dist

    dist.barrier()
    figures = memory()
    dist.barrier()
    return figures


def memory() -> dict:
    """This process's peak RSS (every resident page it maps, shared or not), PSS (each shared page divided among
    the processes mapping it: what the processes add up to) and private memory (the pages no other process maps),
    in MiB."""
    rollup = {line.split()[0]: int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
              if line.split()[0].endswith(":")}  # fmt: skip
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "pss_mib": rollup["Pss:"] / 1024,
            "private_mib": (rollup["Private_Clean:"] + rollup["Private_Dirty:"]) / 1024}  # fmt: skip


def copy_sources(root: Path, count: int, total: int) -> None:
    """Radiographs `count`..`total` - 1 as copies of the first `count` under their own names: each is its own file
    and cache entry (the key holds the path), decoded like any other, without encoding thousands more JPEGs."""
    for i in range(count, total):
        shutil.copyfile(root / "train" / f"p{i % count:05d}.dcm", root / "train" / f"p{i:05d}.dcm")


# %% The whole benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, default=None, help="cases per pipeline (default: COUNTS)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--kinds", nargs="*", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--no-torchrun", action="store_true", help="skip pneumonia's 2-process memory measurement")
    parser.add_argument("--torchrun-count", type=int, default=0, help="radiographs under torchrun (default: as "
                        "--counts; more are copies of those, e.g. 26684 for RSNA's full count)")  # fmt: skip
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: kind, mode, scratch folder, count
    parser.add_argument("--epoch", nargs=2, help=argparse.SUPPRESS)  # internal, under torchrun: mode, scratch
    parser.add_argument("--labels", type=Path, help=argparse.SUPPRESS)  # internal: the folder of the label CSVs
    args = parser.parse_args()
    args.torchrun_count = max(args.torchrun_count, args.counts or COUNTS["pneumonia"])
    if args.labels:
        print(json.dumps(time_read_patients(args.labels)))
        return
    if args.one:  # a child process: one measurement, printed as JSON
        kind, mode, scratch, count = args.one
        print(json.dumps(start(kind, mode, Path(scratch) / "data" / kind, Path(scratch) / "cache" / kind, int(count))))
        return
    if args.epoch:
        mode, scratch = args.epoch
        distributed_epoch(mode, Path(scratch) / "data" / "pneumonia", Path(scratch) / "cache" / "pneumonia",
                          Path(scratch))  # fmt: skip
        return
    report = {"counts": {}, "results": {}, "torchrun": {}}
    with tempfile.TemporaryDirectory(prefix="startup_bench_") as scratch:
        for kind in args.kinds:
            count = args.counts or COUNTS[kind]
            root = Path(scratch) / "data" / kind
            begin = time.perf_counter()
            write_sources(kind, root, count)
            print(f"{kind}: {count} stand-ins written in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
            report["counts"][kind] = count
            report["results"][kind] = {}
            for mode in ("today", "cold", "warm"):
                if mode != "warm":  # lung's prepared folder: written again by today's way and the cold one
                    shutil.rmtree(root.parent / "segmentation", ignore_errors=True)
                run = subprocess.run([sys.executable, __file__, "--one", kind, mode, scratch, str(count)],
                                     capture_output=True, text=True)  # fmt: skip
                if run.returncode:
                    sys.exit(f"{kind} {mode} failed:\n{run.stderr[-4000:]}")
                report["results"][kind][mode] = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"  {mode}: {report['results'][kind][mode]['seconds']:.1f} s", file=sys.stderr)
            if kind == "pneumonia" and not args.no_torchrun:
                copy_sources(root, count, args.torchrun_count)
                shutil.rmtree(Path(scratch) / "cache" / kind)  # cold: process 0 builds it, the other waits
                for mode in ("today", "cold", "warm"):
                    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__, "--epoch",
                               mode, scratch]  # fmt: skip
                    run = subprocess.run(command, capture_output=True, text=True)
                    if run.returncode:
                        sys.exit(f"pneumonia under torchrun ({mode}) failed:\n{run.stderr[-4000:]}")
                    report["torchrun"][mode] = [json.loads((Path(scratch) / f"rank{r}.json").read_text())
                                                for r in (0, 1)]  # fmt: skip
            shutil.rmtree(root)  # the disk holds one pipeline's stand-ins at a time
        report["labels"] = read_labels(Path(scratch))
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def read_labels(folder: Path, rows: int = 30_000) -> dict:
    """The RSNA label and class CSVs at the real size, read by pneumonia's own `read_patients` (read, checked, one
    dict per patient with its boxes), in a fresh process as a run reads them."""
    import pandas as pd

    rng = np.random.default_rng(0)
    patients = [f"{p:08x}-0000" for p in rng.integers(0, 26_684, rows)]
    target = rng.random(rows) < 0.3
    table = pd.DataFrame({"patientId": patients,
                          "x": np.where(target, rng.uniform(0, 700, rows).round(), np.nan),
                          "y": np.where(target, rng.uniform(0, 700, rows).round(), np.nan),
                          "width": np.where(target, 200.0, np.nan), "height": np.where(target, 300.0, np.nan),
                          "Target": target.astype(int)})  # fmt: skip
    table.to_csv(folder / "stage_2_train_labels.csv", index=False)
    classes = pd.DataFrame({"patientId": patients, "class": np.where(target, "Lung Opacity", "Normal")})
    classes.to_csv(folder / "stage_2_detailed_class_info.csv", index=False)
    run = subprocess.run([sys.executable, __file__, "--labels", str(folder)], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"reading the labels failed:\n{run.stderr[-4000:]}")
    return {"rows": rows, **json.loads(run.stdout.strip().splitlines()[-1])}


def time_read_patients(folder: Path) -> dict:
    module = load_script("pneumonia")
    begin = time.perf_counter()
    patients = module.read_patients(folder)
    return {"patients": len(patients), "seconds": time.perf_counter() - begin}


def table(report: dict) -> str:
    lines = ["| pipeline (source, full size) | cases | to the first batch: today / cold / warm | per case: today / "
             "cold / warm | warm / cold | cold speed-up | peak RSS today / cold / warm (workers) | full dataset: today "
             "/ cold / warm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for kind, result in report["results"].items():
        count, full = report["counts"][kind], FULL_COUNTS[kind]
        seconds = [result[mode]["seconds"] for mode in ("today", "cold", "warm")]
        per_case = " / ".join(f"{s / count * 1e3:.1f} ms" if s / count < 1 else f"{s / count:.2f} s" for s in seconds)
        rss = " / ".join(f"{result[m]['peak_rss_mib']:.0f}" for m in ("today", "cold", "warm"))
        rss += f" MiB ({result['cold']['peak_rss_worker_mib']:.0f})"
        extrapolated = " / ".join(f"{s / count * full / 60:.1f}" for s in seconds)
        lines.append(f"| {kind} ({SOURCE[kind]}) | {count} | {' / '.join(f'{s:.1f}' for s in seconds)} s | {per_case} "
                     f"| {seconds[2] / seconds[1]:.1%} | {seconds[0] / seconds[1]:.2f}x | {rss} | {full:,}: "
                     f"{extrapolated} min |")  # fmt: skip
    runs = report.get("torchrun", {})
    if runs:
        lines += [f"\nPneumonia under torchrun, 2 processes, {runs['today'][0]['radiographs']:,} radiographs (data "
                  "loaded, one epoch's shard read), per process, in MiB (before any radiograph):\n",
                  "| way | peak RSS | PSS | private | peak RSS / today's | after a second epoch: peak RSS, PSS |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for mode, ranks in runs.items():
        figures = [" / ".join(f"{x[name]:.0f} ({x[f'libraries_{name}']:.0f})" for x in ranks)
                   for name in ("peak_rss_mib", "pss_mib", "private_mib")]  # fmt: skip
        ratio = " / ".join(f"{x['peak_rss_mib'] / t['peak_rss_mib']:.2f}x" for x, t in zip(ranks, runs["today"]))
        second = " / ".join(f"{x['epoch2_peak_rss_mib']:.0f}, {x['epoch2_pss_mib']:.0f}" for x in ranks)
        lines.append(f"| {mode} | {' | '.join(figures)} | {ratio} | {second} |")
    labels = report["labels"]
    lines.append(f"\nRSNA labels (read_patients): {labels['rows']:,} rows, {labels['patients']:,} patients read, "
                 f"checked and grouped in {labels['seconds']:.2f} s")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()

//! Benchmark recipe of `mimlab bench`: the rows (inference, a finetuning step and a SimMIM
//! pretraining step for the CPU presets and `swinv2_tiny_window8_256`, the MoE MLP and one Swin-V2
//! block alone, a training step and inference of the digits-det FCOS detector and of the
//! digits-seg segmentors, UPerNet and the light SegFormer head; two square f32 GEMMs, the run's
//! GEMM peak that the rows with a FLOP count are given a share of), their selection by filter,
//! running them and the JSON report.
//! `scripts/bench_pytorch.py` measures the same rows with PyTorch + timm.
//!
//! The measuring (timing, median, spread, peak RSS, table) is [`mimlab_engine::bench`]; this file
//! only says what each row runs.
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::bench::{measure, Iters, Report, Row, GEMM_PREFIX};
use mimlab_engine::data::ObjectBox;
use mimlab_engine::device::{
    device_name, peak_device_memory_mib, reset_peak_device_memory, with_cpu_threads,
};
use mimlab_engine::fsutil::write_atomic;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::optim::{param_groups, AdamW};
use mimlab_engine::rng::{rng_for, SharedRng};
use mimlab_finetune::detect::{DetectorConfig, FcosDetector, ImageMeta};
use mimlab_finetune::segment::{HeadKind, Segmentor};
use mimlab_models::moe::{MoeConfig, MoeMlp};
use mimlab_models::swin_v2::{Block, SwinV2, SwinV2Config};
use mimlab_pretrain::simmim::mask::{MaskGenerator, SimMimConfig};
use mimlab_pretrain::simmim::SimMim;

use crate::experiment::Experiment;

/// What a row runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Task {
    /// Eval forward with the classifier head, no gradients.
    Inference,
    /// Classifier forward (train mode), cross-entropy, backward, AdamW step.
    Finetune,
    /// SimMIM: mask token + random masks, linear pixel head, masked L1, backward, AdamW step.
    Simmim,
    /// MoE MLP (8 experts, top-1) alone, eval forward on stage-1 sized tokens.
    Moe { experts: usize },
    /// One shifted Swin-V2 block of `swinv2_tiny_window8_256` stage 0, eval forward.
    BlockForward,
    /// The same block, train forward + backward (no optimizer).
    BlockBackward,
    /// The [`DETECT_RECIPE`] detector: train forward, FCOS loss of [`synthetic_boxes`],
    /// backward, AdamW step.
    DetectTrain,
    /// The same detector: eval forward and decoding to detections, as evaluation does.
    DetectInference,
    /// The [`SEGMENT_RECIPE`] segmentor with this decode head: train forward, the loss of
    /// [`synthetic_class_maps`] (logits upsampled to the labels, cross-entropy with ignore, the
    /// auxiliary loss), backward, AdamW step.
    SegmentTrain(HeadKind),
    /// The same segmentor: eval forward, logits upsampled to the input and the argmax, as
    /// evaluation does.
    SegmentInference(HeadKind),
    /// One f32 product of two `[n, n]` matrices: candle's `matmul` (the gemm crate's own split
    /// over the threads) or, `linear`, [`mimlab_models::ops::linear`] (single-threaded gemms on
    /// row blocks, bias as the initial output). The fastest is the run's GEMM peak
    /// ([`mimlab_engine::bench::gemm_peak`]).
    Gemm { n: usize, linear: bool },
}

/// One row of the table: `name` is `preset/task`, `layer/variant` or `detect/model/task`.
#[derive(Debug, Clone)]
pub struct Spec {
    name: String,
    preset: &'static str,
    task: Task,
    batch: usize,
    img: usize,
}

/// Presets, their two image sizes and two batch sizes (batch 8 everywhere: the acceptance row).
const PRESETS: &[(&str, [usize; 2], [usize; 2])] = &[
    ("swinv2_nano", [32, 64], [8, 32]),
    ("swinv2_micro", [64, 128], [8, 16]),
    ("swinv2_tiny_window8_256", [128, 256], [4, 8]),
];

/// Side of the `gemm/` rows' square matrices: 17.2 GFLOP per product, ~0.1 s on 2 cores.
const GEMM_SIDE: usize = 2048;

/// MoE rows: 64 images of 8x8 tokens at 96 channels (hidden 384), like the MoE bench.
const MOE_TOKENS: (usize, usize, usize, usize) = (64, 8, 96, 384);

/// The recipe whose detector (`model:` and `detect:` sections, resolved as `mimlab finetune`
/// resolves them) the `detect/` rows run, so the rows follow the recipe: swinv2_nano with window
/// 8, FPN of 64 channels on stages 1-3, FCOS head of 2 x 64-channel convs, 10 classes.
const DETECT_RECIPE: &str = "configs/detect/swinv2_nano_digits_det.yaml";

/// Detection rows: the recipe's image size, its batch 16 and batch 8.
const DETECT_ROWS: (usize, [usize; 2]) = (128, [8, 16]);

/// The recipe whose segmentor (`model:` and `segment:` sections) the `segment/` rows run:
/// swinv2_nano with window 8, UPerNet of 32 channels on the four stages with pool scales 1, 2, 4,
/// 11 classes; the `segformer` rows swap the decode head for the light one at the same width. The
/// rows keep mmseg's 32-channel auxiliary FCN head on stage 2 (weight 0.4) and dropout 0.1,
/// which the recipe has dropped since, as `scripts/bench_pytorch.py` builds them.
const SEGMENT_RECIPE: &str = "configs/segment/swinv2_nano_digits_seg.yaml";

/// Segmentation rows: the recipe's image size, its batch 16 and batch 8.
const SEGMENT_ROWS: (usize, [usize; 2]) = (128, [8, 16]);

fn specs() -> Vec<Spec> {
    let mut out = vec![];
    for &(preset, imgs, batches) in PRESETS {
        for img in imgs {
            for batch in batches {
                for (task, t) in [
                    (Task::Inference, "inference"),
                    (Task::Finetune, "finetune"),
                    (Task::Simmim, "simmim"),
                ] {
                    out.push(Spec {
                        name: format!("{preset}/{t}"),
                        preset,
                        task,
                        batch,
                        img,
                    });
                }
            }
        }
    }
    for (linear, n) in [(false, "matmul"), (true, "linear")] {
        out.push(Spec {
            name: format!("{GEMM_PREFIX}{n}_{GEMM_SIDE}"),
            preset: "",
            task: Task::Gemm {
                n: GEMM_SIDE,
                linear,
            },
            batch: 1,
            img: 0,
        });
    }
    let (b, side, _, _) = MOE_TOKENS;
    for (task, n) in [
        (Task::Moe { experts: 0 }, "mlp/dense"),
        (Task::Moe { experts: 8 }, "mlp/moe_e8_top1"),
    ] {
        out.push(Spec {
            name: n.into(),
            preset: "",
            task,
            batch: b,
            img: side * 4,
        });
    }
    for (task, n) in [
        (Task::BlockForward, "block/tiny_w8_s0_shifted_fwd"),
        (Task::BlockBackward, "block/tiny_w8_s0_shifted_fwd_bwd"),
    ] {
        out.push(Spec {
            name: n.into(),
            preset: "swinv2_tiny_window8_256",
            task,
            batch: 8,
            img: 256,
        });
    }
    let (img, batches) = DETECT_ROWS;
    for batch in batches {
        for (task, t) in [
            (Task::DetectTrain, "train"),
            (Task::DetectInference, "inference"),
        ] {
            out.push(Spec {
                name: format!("detect/nano_fcos/{t}"),
                preset: "",
                task,
                batch,
                img,
            });
        }
    }
    let (img, batches) = SEGMENT_ROWS;
    for (head, h) in [
        (HeadKind::Upernet, "nano_upernet"),
        (HeadKind::Segformer, "nano_segformer"),
    ] {
        for batch in batches {
            for (task, t) in [
                (Task::SegmentTrain(head), "train"),
                (Task::SegmentInference(head), "inference"),
            ] {
                out.push(Spec {
                    name: format!("segment/{h}/{t}"),
                    preset: "",
                    task,
                    batch,
                    img,
                });
            }
        }
    }
    out
}

/// The rows `filters` selects (all when empty), in table order.
fn selected(filters: &[String]) -> Vec<Spec> {
    specs()
        .into_iter()
        .filter(|s| {
            let key = Row::key(&s.name, s.img, s.batch);
            filters.is_empty() || filters.iter().any(|f| key.contains(f.as_str()))
        })
        .collect()
}

impl Spec {
    /// The row's `NAME img=IMG batch=B` (what `--filter` matches and `--list` prints).
    pub fn key(&self) -> String {
        Row::key(&self.name, self.img, self.batch)
    }

    /// GFLOP of one iteration where the row has an analytic count: the preset rows from
    /// [`SwinV2Config::macs`] (2 FLOP per multiply-add, the batch's images; a training step
    /// 3x the forward: the backward computes two products per forward product, the patch
    /// embedding's unneeded input gradient included, under 1%), SimMIM with its linear pixel
    /// head ([`SimMim::macs`]); the `gemm/` rows `2 n^3`; other rows none.
    pub fn gflop(&self) -> Result<Option<f64>> {
        let per_image = |macs: u64| 2.0 * macs as f64 * self.batch as f64 / 1e9;
        Ok(match self.task {
            Task::Inference => Some(per_image(preset_at(self.preset, self.img)?.macs())),
            Task::Finetune => Some(3.0 * per_image(preset_at(self.preset, self.img)?.macs())),
            Task::Simmim => Some(3.0 * per_image(SimMim::macs(&preset_at(self.preset, self.img)?))),
            Task::Gemm { n, .. } => Some(2.0 * (n as f64).powi(3) / 1e9),
            _ => None,
        })
    }
}

/// The rows `filters` selects (all when empty), in table order; an error when none matches.
pub fn select(filters: &[String]) -> Result<Vec<Spec>> {
    let specs = selected(filters);
    anyhow::ensure!(
        !specs.is_empty(),
        "--filter {:?} matches no row (see `mimlab bench --list`)",
        filters
    );
    Ok(specs)
}

/// Iterations of a row: `quick` = one timed call and no warm-up; else `warmup` untimed calls and
/// exactly `timed` timed ones, or (None) at least 3 within a ~2 s budget.
pub fn iters(quick: bool, warmup: usize, timed: Option<usize>) -> Iters {
    if quick {
        Iters {
            warmup: 0,
            timed: 1,
            budget_s: 0.0,
        }
    } else {
        Iters {
            warmup,
            timed: timed.unwrap_or(3),
            budget_s: if timed.is_some() { 0.0 } else { 2.0 },
        }
    }
}

/// Runs `specs` on `dev` with `threads` CPU compute threads (0 = all cores), one line per row on
/// stderr as it finishes; the report holds the rows in order.
pub fn run(specs: &[Spec], threads: usize, iters: Iters, dev: &Device) -> Result<Report> {
    let threads = if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let device = match dev {
        Device::Cpu => "cpu".to_string(),
        _ => device_name(dev),
    };
    eprintln!(
        "mimlab bench: {} rows, {device}, {threads} CPU threads, {}",
        specs.len(),
        cpu_model()
    );
    // The rows run on a compute thread, as training does (`device::with_cpu_threads`).
    let rows = with_cpu_threads(threads, || -> Result<Vec<Row>> {
        let mut rows = vec![];
        for s in specs {
            let mut row = run_row(s, iters, dev)?;
            row.gflop = s.gflop()?;
            eprintln!(
                "{:<34} b{:<3} {:>4}px {:>9.1} ms {:>8.1} img/s {:>6.0} MiB",
                row.name, row.batch, row.img, row.median_ms, row.images_per_s, row.peak_rss_mib
            );
            rows.push(row);
        }
        Ok(rows)
    })??;
    Ok(Report {
        tool: "mimlab".into(),
        device,
        threads,
        rows,
    })
}

/// Writes `report` as pretty JSON (the schema `scripts/bench_pytorch.py` writes) to `path`.
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(report)?.as_bytes())
}

/// The CPU's model name from `/proc/cpuinfo` (empty elsewhere).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default()
}

/// The preset at `img` pixels (windows clamp to the stage maps as the official code does).
fn preset_at(name: &str, img: usize) -> Result<SwinV2Config> {
    let cfg = SwinV2Config {
        preset: None,
        img_size: img,
        ..SwinV2Config::preset(name)?
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Uniform-ish random images `[B, 3, img, img]`, seeded.
fn images(batch: usize, img: usize, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, (batch, 3, img, img), dev)?)
}

/// The preset's classifier at `img` pixels, seeded, with its variables.
fn classifier(preset: &str, img: usize, dev: &Device) -> Result<(SwinV2Config, VarMap, SwinV2)> {
    let cfg = preset_at(preset, img)?;
    let vm = VarMap::new();
    let model = SwinV2::new(
        &cfg,
        false,
        SharedRng::new(0),
        seeded_var_builder(&vm, 0, DType::F32, dev),
    )?;
    Ok((cfg, vm, model))
}

/// Where a recipe the rows follow is read: the checkout the binary was built from, whatever the
/// working directory; a binary moved to another machine (a GPU machine) reads it from a checkout
/// in the working directory.
fn recipe_path(recipe: &str) -> std::path::PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(recipe);
    if built.is_file() {
        built
    } else {
        Path::new(recipe).to_path_buf()
    }
}

/// The [`DETECT_RECIPE`] detector's config at `img` pixels ([`recipe_path`]).
fn detect_config(img: usize) -> Result<DetectorConfig> {
    let path = recipe_path(DETECT_RECIPE);
    let exp = Experiment::load(Some(&path), &[format!("model.img_size={img}")])?;
    exp.detect.detector(&exp.model)
}

/// The [`DETECT_RECIPE`] detector at `img` pixels, seeded, with its variables.
fn detector(img: usize, dev: &Device) -> Result<(VarMap, FcosDetector)> {
    let cfg = detect_config(img)?;
    let vm = VarMap::new();
    let model = FcosDetector::new(
        &cfg,
        SharedRng::new(0),
        seeded_var_builder(&vm, 0, DType::F32, dev),
    )?;
    Ok((vm, model))
}

/// The [`SEGMENT_RECIPE`] segmentor at `img` pixels with decode head `head`, seeded, with its
/// variables.
fn segmentor(img: usize, head: HeadKind, dev: &Device) -> Result<(VarMap, Segmentor)> {
    let path = recipe_path(SEGMENT_RECIPE);
    let exp = Experiment::load(Some(&path), &[format!("model.img_size={img}")])?;
    let mut section = mimlab_finetune::segment::SegmentSection {
        head,
        auxiliary_head: mimlab_finetune::segment::AuxHeadConfig {
            stage: Some(2),
            channels: 32,
            weight: 0.4,
        },
        ..exp.segment
    };
    section.decode_head.dropout = 0.1;
    let vm = VarMap::new();
    let model = Segmentor::new(
        &exp.model,
        &section,
        SharedRng::new(0),
        seeded_var_builder(&vm, 0, DType::F32, dev),
    )?;
    Ok((vm, model))
}

/// Labels of the segmentation rows `[B, img, img]` u32: per image, 16-pixel squares of classes
/// `(i + row + 2 * column) % 11` and every 7th pixel ignored (255). `scripts/bench_pytorch.py`
/// makes the same maps.
fn synthetic_class_maps(batch: usize, img: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..batch * img * img)
        .map(|k| {
            let (i, y, x) = (k / (img * img), k / img % img, k % img);
            if k % 7 == 0 {
                255
            } else {
                ((i + y / 16 + 2 * (x / 16)) % 11) as u32
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (batch, img, img), dev)?)
}

/// Ground truth of the detection rows: per image three squares of 16, 48 and 96 px (one in each
/// of the recipe's regression ranges) at positions that vary with the image, classes 0-9, in
/// pixels of an `img`-sided image (`img > 96`). `scripts/bench_pytorch.py` places the same boxes.
fn synthetic_boxes(batch: usize, img: usize) -> Vec<Vec<ObjectBox>> {
    (0..batch)
        .map(|i| {
            [16, 48, 96]
                .into_iter()
                .enumerate()
                .map(|(j, side)| {
                    let x = (37 * i + 53 * j) % (img - side);
                    let y = (29 * i + 71 * j + 11) % (img - side);
                    ObjectBox {
                        xyxy: [x, y, x + side, y + side].map(|v| v as f32),
                        class: ((3 * i + j) % 10) as u32,
                        crowd: false,
                    }
                })
                .collect()
        })
        .collect()
}

/// AdamW over every variable (timm/SimMIM defaults: betas (0.9, 0.999), eps 1e-8, wd 0.05).
fn adamw(vm: &VarMap) -> Result<AdamW> {
    AdamW::new(param_groups(vm, 0.05, &[], &|_| 1.0), (0.9, 0.999), 1e-8)
}

/// [`measure`] on `dev`: each timed call waits for the device to finish its work, and on a GPU
/// the row gets the peak device memory of its setup and calls.
fn measure_on<S>(
    dev: &Device,
    s: &Spec,
    iters: Iters,
    setup: impl FnOnce() -> Result<S>,
) -> Result<Row>
where
    S: FnMut() -> Result<()>,
{
    reset_peak_device_memory(dev)?;
    let sync = dev.clone();
    let mut row = measure(&s.name, s.batch, s.img, iters, || {
        let mut step = setup()?;
        Ok(move || {
            step()?;
            sync.synchronize()?;
            Ok(())
        })
    })?;
    row.peak_device_mib = peak_device_memory_mib(dev)?;
    Ok(row)
}

fn run_row(s: &Spec, iters: Iters, dev: &Device) -> Result<Row> {
    let (batch, img) = (s.batch, s.img);
    match s.task {
        Task::Inference => measure_on(dev, s, iters, || {
            let (_, _vm, model) = classifier(s.preset, img, dev)?;
            let x = images(batch, img, dev)?;
            Ok(move || {
                model.forward(&x, false)?;
                Ok(())
            })
        }),
        Task::Finetune => measure_on(dev, s, iters, || {
            let (cfg, vm, model) = classifier(s.preset, img, dev)?;
            let mut opt = adamw(&vm)?;
            let x = images(batch, img, dev)?;
            let labels: Vec<u32> = (0..batch as u32)
                .map(|i| i * 7 % cfg.num_classes as u32)
                .collect();
            let y = Tensor::new(labels, dev)?;
            Ok(move || {
                let (logits, _moe) = model.forward(&x, true)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                opt.step(&loss.backward()?, 1e-4)?;
                Ok(())
            })
        }),
        Task::Simmim => measure_on(dev, s, iters, || {
            let cfg = preset_at(s.preset, img)?;
            // official mask patch 32 where the image has room for a grid of them
            let sim = SimMimConfig {
                mask_patch_size: (img / 4).min(32),
                num_pictures: 0,
                ..SimMimConfig::default()
            };
            let vm = VarMap::new();
            let model = SimMim::new(
                &cfg,
                &sim,
                SharedRng::new(0),
                seeded_var_builder(&vm, 0, DType::F32, dev),
            )?;
            let mut opt = adamw(&vm)?;
            let gen = MaskGenerator::for_model(&cfg, &sim)?;
            let g = gen.grid();
            let mut rng = rng_for(0, &[]);
            let m: Vec<f32> = (0..batch)
                .flat_map(|_| gen.generate(&mut rng))
                .map(f32::from)
                .collect();
            let mask = Tensor::from_vec(m, (batch, g, g), dev)?;
            let x = images(batch, img, dev)?;
            Ok(move || {
                let (loss, _, _moe) = model.forward(&x, &mask, true)?;
                opt.step(&loss.backward()?, 1e-4)?;
                Ok(())
            })
        }),
        Task::Moe { experts } => measure_on(dev, s, iters, || {
            let (b, side, c, hid) = MOE_TOKENS;
            let x = Tensor::randn(0f32, 1.0, (b * side * side, c), dev)?;
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, 0, DType::F32, dev);
            let rng = SharedRng::new(0);
            let moe = if experts > 0 {
                let cfg = MoeConfig {
                    num_experts: experts,
                    top_k: 1,
                    ..MoeConfig::default()
                };
                Some(MoeMlp::new(c, hid, &cfg, 0.0, vb.clone())?)
            } else {
                None
            };
            // dense: the Swin-V2 block MLP fc1 -> GELU(erf) -> fc2 through the ops the model's
            // `Mlp` uses (fc1 and its GELU as one node), same init as the experts
            let w1 = (Tensor::randn(0f32, 1.0, (hid, c), dev)? * 0.005)?;
            let b1 = Tensor::zeros(hid, DType::F32, dev)?;
            let w2 = (Tensor::randn(0f32, 1.0, (c, hid), dev)? * 0.005)?;
            let b2 = Tensor::zeros(c, DType::F32, dev)?;
            Ok(move || {
                match &moe {
                    Some(m) => {
                        m.forward(&x, &rng, false)?;
                    }
                    None => {
                        let h = mimlab_models::ops::linear_gelu(&x, &w1, &b1)?;
                        mimlab_models::ops::linear(&h, &w2, Some(&b2))?;
                    }
                }
                Ok(())
            })
        }),
        Task::BlockForward | Task::BlockBackward => measure_on(dev, s, iters, || {
            let cfg = preset_at(s.preset, img)?;
            let res = img / cfg.patch_size;
            let vm = VarMap::new();
            let blk = Block::standalone(
                &cfg,
                0,
                1,
                (res, res),
                seeded_var_builder(&vm, 0, DType::F32, dev),
            )?;
            let c = cfg.embed_dim;
            let x = Tensor::randn(0f32, 1.0, (batch, res, res, c), dev)?;
            let train = s.task == Task::BlockBackward;
            Ok(move || {
                let (y, _moe) = blk.forward(&x, train)?;
                if train {
                    y.sqr()?.mean_all()?.backward()?;
                }
                Ok(())
            })
        }),
        Task::DetectTrain => measure_on(dev, s, iters, || {
            let (vm, det) = detector(img, dev)?;
            let mut opt = adamw(&vm)?;
            let x = images(batch, img, dev)?;
            let boxes = synthetic_boxes(batch, img);
            Ok(move || {
                // a dense backbone: no MoE aux loss to add
                let (out, _moe) = det.forward(&x, true)?;
                let loss = det.loss(&out, &boxes)?.total()?;
                opt.step(&loss.backward()?, 1e-4)?;
                Ok(())
            })
        }),
        Task::DetectInference => measure_on(dev, s, iters, || {
            let (_vm, det) = detector(img, dev)?;
            let x = images(batch, img, dev)?;
            let metas = vec![
                ImageMeta {
                    valid_size: (img, img),
                    scale: (1.0, 1.0),
                };
                batch
            ];
            Ok(move || {
                let (out, _moe) = det.forward(&x, false)?;
                det.predict(&out, &metas)?;
                Ok(())
            })
        }),
        Task::SegmentTrain(head) => measure_on(dev, s, iters, || {
            let (vm, seg) = segmentor(img, head, dev)?;
            let mut opt = adamw(&vm)?;
            let x = images(batch, img, dev)?;
            let labels = synthetic_class_maps(batch, img, dev)?;
            Ok(move || {
                let (out, _moe) = seg.forward(&x, true)?;
                let loss = seg.loss(&out, &labels)?.total;
                opt.step(&loss.backward()?, 1e-4)?;
                Ok(())
            })
        }),
        Task::Gemm { n, linear } => measure_on(dev, s, iters, || {
            let a = Tensor::randn(0f32, 1.0, (n, n), dev)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), dev)?;
            let bias = Tensor::zeros(n, DType::F32, dev)?;
            Ok(move || {
                if linear {
                    mimlab_models::ops::linear(&a, &b, Some(&bias))?;
                } else {
                    a.matmul(&b)?;
                }
                Ok(())
            })
        }),
        Task::SegmentInference(head) => measure_on(dev, s, iters, || {
            let (_vm, seg) = segmentor(img, head, dev)?;
            let x = images(batch, img, dev)?;
            Ok(move || {
                seg.infer(&x)?.argmax(1)?;
                Ok(())
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimlab_finetune::detect::fcos_targets::assign;

    #[test]
    fn every_preset_row_has_batch_8_and_a_valid_resolution() {
        for &(preset, imgs, batches) in PRESETS {
            assert!(batches.contains(&8), "{preset}");
            for img in imgs {
                preset_at(preset, img).unwrap();
            }
        }
        assert_eq!(
            specs().len(),
            PRESETS.len() * 2 * 2 * 3 + 2 + 4 + 2 * 2 + 2 * 2 * 2
        );
    }

    /// The detection rows build the recipe's detector, and their boxes give positives on every
    /// level (so the box and centerness losses run, not only the classification one).
    #[test]
    fn detect_rows_follow_the_recipe_and_their_boxes_reach_every_level() -> Result<()> {
        let (img, batches) = DETECT_ROWS;
        let cfg = detect_config(img)?;
        assert_eq!(cfg.backbone.img_size, img);
        assert_eq!((cfg.backbone.embed_dim, cfg.backbone.window_size), (32, 8));
        let head = &cfg.head;
        assert_eq!(
            (head.strides.as_slice(), head.num_classes),
            (&[8, 16, 32][..], 10)
        );
        let boxes = synthetic_boxes(batches[1], img);
        for b in boxes.iter().flatten() {
            assert!(
                b.xyxy.iter().all(|&v| (0.0..=img as f32).contains(&v)),
                "{b:?}"
            );
        }
        let sizes: Vec<(usize, usize)> = head.strides.iter().map(|s| (img / s, img / s)).collect();
        let t = assign(&head.assign_config(), &sizes, &boxes)?;
        // scripts/bench_pytorch.py's mmdet-style assignment of the same boxes: 421 positives
        assert_eq!(t.num_pos(), 421);
        // (level, image) of each positive: points are flattened by level, then image
        let mut seen = vec![vec![false; boxes.len()]; sizes.len()];
        let mut first = 0;
        for (l, (h, w)) in sizes.iter().enumerate() {
            let n = h * w;
            for &p in &t.positives {
                if (first..first + n * boxes.len()).contains(&p) {
                    seen[l][(p - first) / n] = true;
                }
            }
            first += n * boxes.len();
        }
        for (l, images) in seen.iter().enumerate() {
            assert!(
                images.iter().all(|&y| y),
                "level {l}: images without positives {images:?}"
            );
        }
        Ok(())
    }

    /// The segmentation rows build the recipe's segmentor with either head, and their labels hold
    /// every class and the ignore value.
    #[test]
    fn segment_rows_follow_the_recipe() -> Result<()> {
        let (img, _) = SEGMENT_ROWS;
        let (vm, seg) = segmentor(img, HeadKind::Segformer, &Device::Cpu)?;
        assert_eq!(seg.num_classes(), 11);
        assert_eq!(seg.backbone().config().window_size, 8);
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names
            .iter()
            .any(|k| k == "decode_head.fusion_conv.conv.weight"));
        assert!(names.iter().any(|k| k == "auxiliary_head.conv_seg.weight"));
        let l = synthetic_class_maps(2, img, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let mut seen: Vec<u32> = l.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (0..11).chain([255]).collect::<Vec<u32>>());
        // the first values of image 0: (0 + 0 + 2 * (x / 16)) % 11, every 7th ignored
        assert_eq!(&l[..3], &[255, 0, 0]);
        assert_eq!(l[16], 2);
        Ok(())
    }

    #[test]
    fn filters_select_by_name_size_and_batch() {
        let keys = |f: &[&str]| -> Vec<String> {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            selected(&f)
                .iter()
                .map(|s| Row::key(&s.name, s.img, s.batch))
                .collect()
        };
        assert_eq!(keys(&["nano/simmim img=64 batch=8"]).len(), 1);
        assert_eq!(keys(&["swinv2_nano"]).len(), 12);
        assert_eq!(keys(&["detect"]).len(), 4);
        assert_eq!(keys(&["segment/"]).len(), 8);
        assert_eq!(
            keys(&["segment/nano_segformer/train img=128 batch=8"]).len(),
            1
        );
        assert_eq!(keys(&["detect/nano_fcos/train img=128 batch=16"]).len(), 1);
        assert_eq!(keys(&["img=256 batch=8", "mlp/"]).len(), 3 + 2 + 2);
        assert_eq!(
            keys(&["gemm/"]),
            [
                "gemm/matmul_2048 img=0 batch=1",
                "gemm/linear_2048 img=0 batch=1"
            ]
        );
    }

    #[test]
    fn flop_counts_follow_the_models_multiply_adds() -> Result<()> {
        let row = |key: &str| -> Spec {
            let f = [key.to_string()];
            let mut s = selected(&f);
            assert_eq!(s.len(), 1, "{key}");
            s.remove(0)
        };
        let tiny = preset_at("swinv2_tiny_window8_256", 256)?;
        let gflop = |key: &str| row(key).gflop().unwrap().unwrap();
        // 8 images x 2 FLOP per multiply-add; training 3x the forward
        let fwd = 16.0 * tiny.macs() as f64 / 1e9;
        let inference = gflop("swinv2_tiny_window8_256/inference img=256 batch=8");
        assert!((inference - fwd).abs() < 1e-9 && (inference - 95.04).abs() < 0.01);
        let finetune = gflop("swinv2_tiny_window8_256/finetune img=256 batch=8");
        assert!((finetune - 3.0 * fwd).abs() < 1e-9);
        let simmim = gflop("swinv2_tiny_window8_256/simmim img=256 batch=8");
        assert!((simmim - 48.0 * SimMim::macs(&tiny) as f64 / 1e9).abs() < 1e-9);
        assert!((simmim - 292.32).abs() < 0.01, "{simmim}");
        assert!((gflop("gemm/matmul_2048") - 17.179869184).abs() < 1e-9);
        assert_eq!(row("mlp/dense").gflop()?, None);
        assert_eq!(row("detect/nano_fcos/train img=128 batch=8").gflop()?, None);
        Ok(())
    }
}

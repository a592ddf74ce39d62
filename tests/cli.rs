//! End-to-end tests of the `mimlab` binary: configs, a tiny pretraining run with resume and
//! pictures, the model forward over saved tensors, and the AvgDist table.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{mimlab, ok, require_data, TINY};

fn err(args: &[&str]) -> String {
    let out = mimlab(args);
    assert!(!out.status.success(), "mimlab {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}

#[test]
fn every_shipped_config_resolves() {
    let mut files = vec![];
    yaml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"),
        &mut files,
    );
    assert!(files.len() >= 4, "configs/ holds {} files", files.len());
    // sweep files are another schema (src/sweep, checked by its own tests)
    files.retain(|f| !f.components().any(|c| c.as_os_str() == "sweeps"));
    for f in files {
        let text = ok(&["config", "show", f.to_str().unwrap()]);
        assert!(
            text.contains("model:") && text.contains("preset:"),
            "{}: {text}",
            f.display()
        );
    }
}

#[test]
fn base_inheritance_and_set_reach_the_resolved_config() {
    let text = ok(&[
        "config",
        "show",
        "configs/simmim/swinv2_base_window12_192_100ep.yaml",
        "--set",
        "train.epochs=7",
        "--set",
        "model.depths=[2,2,6,2]",
    ]);
    // From the base file (800ep recipe) ...
    assert!(text.contains("embed_dim: 128"), "{text}");
    assert!(text.contains("norm_target: true"), "{text}");
    // ... overridden by the child file ...
    assert!(text.contains("schedule: cosine"), "{text}");
    // ... and by --set.
    assert!(text.contains("epochs: 7"), "{text}");
    assert!(text.contains("- 6"), "{text}");
}

#[test]
fn config_typos_and_types_are_named() {
    let e = err(&["config", "show", "--set", "train.bas_lr=1e-3"]);
    assert!(
        e.contains("unknown key `train.bas_lr` (did you mean `train.base_lr`?)"),
        "{e}"
    );
    let e = err(&["config", "show", "--set", "train.epochs=ten"]);
    assert!(
        e.contains("train.epochs") && e.contains("invalid type"),
        "{e}"
    );
    let e = err(&["config", "show", "--set", "model.preset=swinv2_huge"]);
    assert!(
        e.contains("swinv2_huge") && e.contains("swinv2_nano"),
        "{e}"
    );
}

#[test]
fn model_info_counts_tiny_params() {
    let text = ok(&[
        "model",
        "info",
        "--set",
        "model.preset=swinv2_tiny_window8_256",
    ]);
    // architecture.md 1.2: SwinV2-T with a 1000-class head has 28,347,154 parameters.
    assert!(text.contains("28347154"), "{text}");
}

#[test]
fn avgdist_prints_csv_and_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let text = ok(&[
        "avgdist",
        "--img-size",
        "64",
        "--mask-patch-sizes",
        "8,16",
        "--ratios",
        "0.4,0.6",
        "--samples",
        "20",
        "--out",
        out,
        "--format",
        "csv",
    ]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "mask_patch_size,ratio,strategy,avgdist");
    assert_eq!(lines.len(), 5, "{text}");
    // Larger mask patches at the same ratio put masked pixels further from visible ones.
    let val = |i: usize| lines[i].split(',').nth(3).unwrap().parse::<f64>().unwrap();
    let row = |p: &str, r: &str| {
        (1..5)
            .find(|&i| lines[i].starts_with(&format!("{p},{r},")))
            .unwrap()
    };
    assert!(val(row("16", "0.6")) > val(row("8", "0.6")), "{text}");
    assert!(val(row("8", "0.6")) > val(row("8", "0.4")), "{text}");
    assert!(dir.path().join("avgdist.png").exists());
    assert!(dir.path().join("avgdist_heatmap.png").exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("avgdist.csv")).unwrap(),
        text
    );
}

/// A few SimMIM steps of a tiny model on Fashion-MNIST, then resume, then pictures.
#[test]
fn pretrain_resume_and_visualize() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().to_str().unwrap();
    let sets = [
        "model.preset=swinv2_nano",
        "model.img_size=32",
        "model.embed_dim=24",
        "model.depths=[1,1]",
        "model.num_heads=[1,2]",
        "simmim.mask_patch_size=8",
        "data.max_samples=256",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.warmup_epochs=0.5",
        "run.name=tiny",
        "run.log_every=1",
        "run.image_every=2",
    ];
    let mut args = vec!["pretrain", "--set"];
    let out_dir = format!("run.output_dir={runs}");
    args.push(&out_dir);
    for s in &sets {
        args.push("--set");
        args.push(s);
    }
    let text = ok(&args);
    assert!(text.contains("done: 4 steps"), "{text}");
    let run = dir.path().join("tiny");
    for f in [
        "config.yaml",
        "metrics.jsonl",
        "checkpoints/latest",
        "checkpoints/step_4.json",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let events = std::fs::read_dir(&run)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out")
        })
        .count();
    assert!(events >= 1);
    let pictures = std::fs::read_dir(run.join("pictures")).unwrap().count();
    assert!(pictures >= 1, "no reconstruction pictures");

    // The run folder's config.yaml repeats the run: same loss at every logged step.
    let losses = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| l.split("\"lr\"").next().unwrap().to_string()) // step, epoch, split, loss
            .collect()
    };
    let config = run.join("config.yaml");
    ok(&[
        "pretrain",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "run.name=again",
    ]);
    let first = losses(&run);
    assert_eq!(first.len(), 4, "{first:?}");
    assert_eq!(losses(&dir.path().join("again")), first);

    // Resume to 6 steps from the run's own config.
    let run_s = run.to_str().unwrap();
    let text = ok(&["pretrain", "--resume", run_s, "--set", "train.max_steps=6"]);
    assert!(text.contains("done: 6 steps"), "{text}");
    assert!(run.join("checkpoints/step_6.json").exists());

    let text = ok(&["visualize", "--run", run_s, "--n", "3"]);
    assert!(text.contains("reconstruction.png"), "{text}");
    let png = image::open(run.join("pictures/reconstruction.png")).unwrap();
    assert!(
        png.width() > 4 * 32 && png.height() >= 3 * 32,
        "{}x{}",
        png.width(),
        png.height()
    );

    // Any folder of images: two generated PNGs (one in a sub-folder), resized and centre-cropped.
    let imgs = dir.path().join("imgs");
    std::fs::create_dir_all(imgs.join("sub")).unwrap();
    image::RgbImage::from_pixel(40, 30, image::Rgb([200, 40, 40]))
        .save(imgs.join("a.png"))
        .unwrap();
    image::RgbImage::from_pixel(50, 50, image::Rgb([40, 200, 40]))
        .save(imgs.join("sub/b.png"))
        .unwrap();
    ok(&[
        "visualize",
        "--run",
        run_s,
        "--images",
        imgs.to_str().unwrap(),
        "--n",
        "8",
    ]);
    let two = image::open(run.join("pictures/reconstruction.png")).unwrap();
    assert_eq!(two.width(), png.width());
    assert!(
        two.height() < png.height(),
        "2 rows expected, got {}x{}",
        two.width(),
        two.height()
    );
    let missing = dir.path().join("no-such-folder");
    let e = err(&[
        "visualize",
        "--run",
        run_s,
        "--images",
        missing.to_str().unwrap(),
    ]);
    assert!(e.contains("no-such-folder"), "{e}");
}

/// `mimlab model run` on the committed PyTorch fixture (scripts/make_fixtures.py, model B: patch 2,
/// 3 stages, window 8 clamped to 4, pretrained windows [6,0,3], 7-class head) reproduces
/// PyTorch's logits, pre_logits and features for both key layouts.
#[test]
fn model_run_matches_pytorch_fixture() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let io = "tests/fixtures/swinv2_b.io.safetensors";
    let reference = candle_core::safetensors::load(io, &Device::Cpu).unwrap();
    let rel_err = |got: &Tensor, want: &Tensor| -> f32 {
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / scale
    };
    for layout in ["official", "timm"] {
        let out = dir.path().join(format!("{layout}.safetensors"));
        let weights = format!("tests/fixtures/swinv2_b.{layout}.safetensors");
        ok(&[
            "model",
            "run",
            "--set",
            "model.img_size=32",
            "--set",
            "model.patch_size=2",
            "--set",
            "model.num_classes=7",
            "--set",
            "model.embed_dim=12",
            "--set",
            "model.depths=[2,2,2]",
            "--set",
            "model.num_heads=[1,2,2]",
            "--set",
            "model.window_size=8",
            "--set",
            "model.pretrained_window_sizes=[6,0,3]",
            "--set",
            "model.drop_path_rate=0.0",
            "--weights",
            &weights,
            "--input",
            io,
            "--output",
            out.to_str().unwrap(),
        ]);
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let want_feat = reference[&format!("{layout}.features")]
            .permute((0, 2, 3, 1))
            .unwrap();
        for (name, want) in [
            ("logits", reference[&format!("{layout}.logits")].clone()),
            (
                "pre_logits",
                reference[&format!("{layout}.pre_logits")].clone(),
            ),
            ("features", want_feat),
        ] {
            let g = &got[name];
            assert_eq!(g.dims(), want.dims(), "{layout} {name}");
            let e = rel_err(g, &want);
            assert!(e < 1e-4, "{layout} {name}: relative error {e}");
        }
    }
}

/// `mimlab model run` of a model configured at 64 px on inputs of 100x148 and 68x92 (batch 2)
/// gives timm's `dynamic_img_size=True` logits, pre-logits and features to 2e-5
/// (scripts/make_dyn_fixtures.py, model A: windows padded, shifted, odd patch merging).
#[test]
fn model_run_on_other_sizes_matches_timm() {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let load = |p: &str| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let inputs = load("tests/fixtures/swinv2_dyn.inputs.safetensors");
    let reference = load("tests/fixtures/swinv2_dyn_a.io.safetensors");
    let rel_err = |got: &Tensor, want: &Tensor| -> f32 {
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        max((got - want).unwrap()) / max(want.clone())
    };
    let sets: Vec<String> = [
        "model.preset=swinv2_nano",
        "model.img_size=64",
        "model.num_classes=5",
        "model.embed_dim=8",
        "model.depths=[2,2]",
        "model.num_heads=[1,2]",
        "model.window_size=4",
        "model.drop_path_rate=0.0",
    ]
    .map(String::from)
    .to_vec();
    let run = |input: &Path, out: &Path| {
        [
            "model",
            "run",
            "--weights",
            "tests/fixtures/swinv2_dyn_a.timm.safetensors",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
        .map(String::from)
    };
    for size in ["100x148", "68x92"] {
        let input = dir.path().join(format!("{size}.in.safetensors"));
        let out = dir.path().join(format!("{size}.out.safetensors"));
        let x = inputs[size].to_dtype(DType::F32).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("input", x)]), &input)
            .unwrap();
        let cmd = run(&input, &out);
        ok(&with_sets(&cmd.each_ref().map(String::as_str), &sets));
        let got = load(out.to_str().unwrap());
        for name in ["logits", "pre_logits", "features"] {
            let mut want = reference[&format!("{size}.{name}")].clone();
            if name == "features" {
                want = want.permute((0, 2, 3, 1)).unwrap(); // written NHWC
            }
            let g = &got[name];
            assert_eq!(g.dims(), want.dims(), "{size} {name}");
            let e = rel_err(g, &want);
            assert!(e <= 2e-5, "{size} {name}: relative error {e}");
        }
    }
    // a size that is not a multiple of the patch size is refused, naming it
    let bad = dir.path().join("bad.safetensors");
    let x = Tensor::zeros((1, 3, 66, 92), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("input", x)]), &bad).unwrap();
    let cmd = run(&bad, &dir.path().join("no.safetensors"));
    let e = err(&with_sets(&cmd.each_ref().map(String::as_str), &sets));
    assert!(e.contains("66x92") && e.contains("patch size 4"), "{e}");
}

/// `--set` pairs as a flat argument list.
fn with_sets<'a, S: AsRef<str>>(cmd: &[&'a str], sets: &'a [S]) -> Vec<&'a str> {
    let mut args: Vec<&str> = cmd.to_vec();
    for s in sets {
        args.push("--set");
        args.push(s.as_ref());
    }
    args
}

/// `finetune --config CONFIG --set ...` for each of `sets`.
fn finetune_with<'a>(config: &'a str, sets: &'a [&'a str]) -> Vec<&'a str> {
    with_sets(&["finetune", "--config", config], sets)
}

#[test]
fn finetune_from_simmim_then_eval_and_probe() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().to_str().unwrap();
    let arch: Vec<&str> = std::iter::once("model.preset=swinv2_nano")
        .chain(TINY)
        .collect();
    let mut sets: Vec<String> = arch.iter().map(|s| s.to_string()).collect();
    sets.extend([
        format!("run.output_dir={runs}"),
        "run.name=pre".into(),
        "train.max_steps=2".into(),
        "simmim.mask_patch_size=8".into(),
        "simmim.num_pictures=0".into(),
    ]);
    ok(&with_sets(&["pretrain"], &sets));
    let pre = dir.path().join("pre");
    let pre_s = pre.to_str().unwrap();

    let mut ft: Vec<String> = arch.iter().map(|s| s.to_string()).collect();
    ft.extend([
        format!("run.output_dir={runs}"),
        "model.num_classes=10".into(),
        // 48 images = 3 batches: step 3 ends epoch 1 of 2, so the final report reuses the
        // trainer's end-of-epoch evaluation, which `eval` below must reproduce
        "data.max_samples=48".into(),
        "train.max_steps=3".into(),
        "train.epochs=2".into(),
        "run.eval_every_epochs=1".into(),
    ]);
    let mut a = ft.clone();
    a.push("run.name=ft".into());
    let out = mimlab(&with_sets(
        &[
            "finetune",
            "-c",
            "configs/finetune/swinv2_nano_fmnist.yaml",
            "--init",
            pre_s,
        ],
        &a,
    ));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // every encoder tensor of the SimMIM checkpoint but its mask_token reaches the classifier
    let ck = candle_core::safetensors::load(
        pre.join("checkpoints/step_2.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let encoder = ck.keys().filter(|k| k.starts_with("encoder.")).count();
    assert!(ck.contains_key("encoder.mask_token") && ck.contains_key("decoder.0.weight"));
    assert!(
        stderr.contains(&format!("init: loaded {} backbone tensors", encoder - 1))
            && stderr.contains("head head.bias, head.weight newly initialized"),
        "{stderr}"
    );
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
    let run = dir.path().join("ft");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval/final.json")).unwrap())
            .unwrap();
    assert_eq!(report["samples"], 48);
    let top1 = report["top1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1));
    assert_eq!(report["classes"][0], "T-shirt/top");
    assert!(run.join("eval/final_confusion.png").is_file());
    let cfg = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(cfg.contains(&format!("init: {pre_s}")), "{cfg}");

    // `eval` of the finished run gives the same top-1 as the end of finetuning.
    let text = ok(&["eval", "--weights", run.to_str().unwrap()]);
    assert!(
        text.contains(&format!("top-1 {top1:.2}%")),
        "{text} vs {top1}"
    );
    assert!(run.join("eval/eval_step_3.json").is_file());

    // Frozen features of the pretrained encoder: k-NN and linear probe at two label fractions.
    let json = dir.path().join("probe").join("probe.json");
    let mut p: Vec<String> = arch.iter().map(|s| s.to_string()).collect();
    p.push("finetune.probe_epochs=5".into());
    ok(&with_sets(
        &[
            "probe",
            "--init",
            pre_s,
            "--fractions",
            "0.5,1",
            "--out",
            json.parent().unwrap().to_str().unwrap(),
        ],
        &p,
    ));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["labels"], 128);
    assert_eq!(j["feature_dim"], 32);
    for r in rows {
        for k in ["knn_top1", "linear_top1"] {
            let v = r[k].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{k} = {v}");
        }
    }

    // Errors name the key at fault.
    let mut bad = ft.clone();
    bad.push("model.embed_dim=24".into());
    let e = err(&with_sets(
        &[
            "finetune",
            "-c",
            "configs/finetune/swinv2_nano_fmnist.yaml",
            "--init",
            pre_s,
        ],
        &bad,
    ));
    assert!(e.contains("model.embed_dim differs"), "{e}");
    let mut bad = ft.clone();
    bad.push("model.num_classes=5".into());
    let e = err(&with_sets(
        &["finetune", "-c", "configs/finetune/swinv2_nano_fmnist.yaml"],
        &bad,
    ));
    assert!(
        e.contains("model.num_classes is 5") && e.contains("10 classes"),
        "{e}"
    );
}

/// A 2-step SimMIM teacher, a 2-step distillation from it (shared CPB, cached features), and the
/// student checkpoint loading into a classifier; teacher errors name the path / key.
#[test]
fn distill_from_a_simmim_run_and_load_the_student_into_a_classifier() {
    use mimlab_engine::run_dir::resolve_init;
    use mimlab_pretrain::backbone::{load_backbone, run_model_section};
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = format!("run.output_dir={}", dir.path().to_str().unwrap());
    let tiny = [
        "model.img_size=32",
        "model.embed_dim=16",
        "model.depths=[1,1]",
        "model.num_heads=[1,2]",
        "model.pretrained_window_sizes=[0,0]",
        "data.max_samples=64",
        "train.batch_size=16",
        "train.max_steps=2",
        "train.warmup_epochs=0",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--set".to_string(), out_dir.clone()];
        for s in tiny.iter().chain(extra) {
            v.push("--set".into());
            v.push(s.to_string());
        }
        v
    };
    let run = |head: &[&str], sets: Vec<String>| -> String {
        let mut a: Vec<&str> = head.to_vec();
        a.extend(sets.iter().map(String::as_str));
        ok(&a)
    };
    let teacher = dir.path().join("teacher");
    run(
        &["pretrain"],
        with(&[
            "run.name=teacher",
            "simmim.mask_patch_size=8",
            "simmim.num_pictures=0",
        ]),
    );
    let cache = format!(
        "distill.cache_features={}",
        dir.path().join("cache").display()
    );
    let text = run(
        &[
            "distill",
            "--config",
            "configs/fd/swinv2_nano_fmnist.yaml",
            "--teacher",
            teacher.to_str().unwrap(),
        ],
        with(&["run.name=student", "distill.shared_cpb=true", &cache]),
    );
    assert!(text.contains("done: 2 steps"), "{text}");
    // the student (shared CPB) loads into a per-block classifier: unshared on load
    let src = resolve_init(&dir.path().join("student")).unwrap();
    let mut cfg = run_model_section(&src.run_config.unwrap()).unwrap();
    assert!(!cfg.shared_cpb);
    cfg.num_classes = 10;
    let (_, vm, report) = load_backbone(&cfg, &src.weights, &candle_core::Device::Cpu).unwrap();
    assert!(report.ignored.iter().any(|k| k == "projector.weight"));
    assert!(vm
        .data()
        .lock()
        .unwrap()
        .contains_key("layers.1.blocks.0.attn.cpb_mlp.2.weight"));
    // errors
    let e = err(&["distill", "--config", "configs/fd/swinv2_nano_fmnist.yaml"]);
    assert!(e.contains("--teacher"), "{e}");
    let bare = dir.path().join("bare.safetensors");
    std::fs::copy(&src.weights, &bare).unwrap();
    let e = err(&[
        "distill",
        "--config",
        "configs/fd/swinv2_nano_fmnist.yaml",
        "--teacher",
        bare.to_str().unwrap(),
    ]);
    assert!(
        e.contains("distill.teacher_model") && e.contains("bare.safetensors"),
        "{e}"
    );
    // the cache was made with seed 0: another seed means other crops, so it is refused
    let mut sets = with(&["run.name=student2", "run.seed=5", &cache]);
    sets.splice(
        0..0,
        ["--teacher".to_string(), teacher.display().to_string()],
    );
    let mut a = vec!["distill", "--config", "configs/fd/swinv2_nano_fmnist.yaml"];
    a.extend(sets.iter().map(String::as_str));
    let e = err(&a);
    assert!(
        e.contains("delete the folder") && e.contains("cache"),
        "{e}"
    );
}

/// `mimlab bench --quick --threads 2 ARGS...`, its stdout (the table).
fn bench_quick(args: &[&str]) -> String {
    ok(&[&["bench", "--quick", "--threads", "2"], args].concat())
}

#[test]
fn bench_quick_prints_the_selected_rows_with_positive_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    // `img=32`: nano's small rows and the MLP rows (64 images of 8x8 tokens); the GEMM rows
    let out = bench_quick(&[
        "--filter",
        "img=32",
        "--filter",
        "gemm/",
        "--json",
        json.to_str().unwrap(),
    ]);
    // header + 2 batches x 3 tasks + the two GEMM rows + the dense and MoE MLP rows
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 6 + 2 + 2, "{out}");
    assert!(lines[0].contains("images/s") && lines[0].contains("peak MiB"));
    assert!(lines[0].ends_with("GFLOP/s  % gemm"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["tool"], "mimlab");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    // FLOP counts: the model rows and the GEMM rows (2 x 2048^3), none for the MLP rows; the
    // fastest GEMM row is the 100% of the share column
    for r in rows {
        let name = r["name"].as_str().unwrap();
        let gflop = r.get("gflop").and_then(|g| g.as_f64());
        if name.starts_with("mlp/") {
            assert_eq!(gflop, None, "{r}");
        } else if name.starts_with("gemm/") {
            assert!((gflop.unwrap() - 17.179869184).abs() < 1e-9, "{r}");
        } else {
            assert!(gflop.unwrap() > 0.0, "{r}");
        }
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("gemm/") && l.ends_with("100.0%")),
        "{out}"
    );
    for task in ["inference", "finetune", "simmim"] {
        for (img, batch) in [(32, 8), (32, 32)] {
            let name = format!("swinv2_nano/{task}");
            assert!(
                rows.iter()
                    .any(|r| r["name"] == name.as_str() && r["img"] == img && r["batch"] == batch),
                "missing {name} {img} {batch}"
            );
        }
    }
    for r in rows {
        for k in ["median_ms", "images_per_s", "peak_rss_mib"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k} of {r}");
        }
    }
    assert!(err(&["bench", "--filter", "no-such-row"]).contains("matches no row"));
}

#[test]
fn bench_quick_runs_the_detection_rows_at_batch_8() {
    // the detector of configs/detect/swinv2_nano_digits_det.yaml: train step and inference
    let out = bench_quick(&[
        "--filter",
        "detect/nano_fcos/train img=128 batch=8",
        "--filter",
        "detect/nano_fcos/inference img=128 batch=8",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 2, "{out}");
    for (line, task) in lines[1..].iter().zip(["train", "inference"]) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols[..3],
            [&format!("detect/nano_fcos/{task}"), "8", "128"],
            "{out}"
        );
        let images_per_s: f64 = cols[cols.len() - 2].parse().unwrap();
        assert!(images_per_s > 0.0, "{out}");
    }
}

/// `mimlab` run from `cwd` with extra environment variables.
fn mimlab_in(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mimlab"));
    cmd.args(args).current_dir(cwd).env_remove("MIMLAB_DATA");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("mimlab binary runs")
}

/// What an installed `mimlab` sees outside the checkout: the data is found through the checkout
/// it was built from (or MIMLAB_DATA), a missing one lists every place looked at; run folders
/// say what they are, TensorBoard gets the config, checkpoint files are as readable as the rest;
/// mistakes (another command's run, a batch larger than the data) are named.
#[test]
fn runs_from_another_directory_and_name_their_mistakes() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = checkout.join("configs/simmim/swinv2_nano_fmnist.yaml");
    let base = [
        "pretrain",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "data.max_samples=64",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.max_steps=2",
        "--set",
        "run.output_dir=runs",
    ];
    let out = mimlab_in(cwd, &[], &base);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let runs: Vec<PathBuf> = std::fs::read_dir(cwd.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    let name = run.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("simmim-swinv2_nano-fashion-mnist-2"),
        "{name}"
    );
    assert!(
        stderr.contains(&format!("run folder: runs/{name}")),
        "{stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let cfg_mode = mode(run.join("config.yaml"));
        assert_eq!(mode(run.join("checkpoints/step_2.safetensors")), cfg_mode);
        assert_eq!(
            mode(run.join("checkpoints/step_2.optim.safetensors")),
            cfg_mode
        );
    }
    let events: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out")
        })
        .collect();
    let tb = mimlab_engine::log::read_events(&events[0]).unwrap();
    use mimlab_engine::log::{HValue, TbEvent};
    let text = tb
        .iter()
        .find_map(|e| match e {
            TbEvent::Text { tag, text, .. } if tag == "config" => Some(text.clone()),
            _ => None,
        })
        .expect("config text");
    assert!(
        text.contains("    train:\n") && text.contains("max_steps: 2"),
        "{text}"
    );
    let hp = tb
        .iter()
        .find_map(|e| match e {
            TbEvent::Hparams { hparams } => Some(hparams.clone()),
            _ => None,
        })
        .expect("hparams");
    assert!(hp.contains(&("train.batch_size".into(), HValue::Number(16.0))));
    assert!(hp.contains(&("model.preset".into(), HValue::Text("swinv2_nano".into()))));

    // No data anywhere: every place looked at, and the fixes.
    let mut bad = base.to_vec();
    bad.extend(["--set", "data.root=nodata"]);
    let out = mimlab_in(cwd, &[], &bad);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    for want in [
        "dataset folder `fashion-mnist` not found; looked in:".to_string(),
        format!(
            "nodata/fashion-mnist (data.root) (from the working directory {}",
            cwd.display()
        ),
        format!(
            "{} (the checkout mimlab was built from)",
            checkout.join("nodata/fashion-mnist").display()
        ),
        "($MIMLAB_DATA is not set)".into(),
        "fix: run scripts/setup-data.sh".into(),
    ] {
        assert!(e.contains(&want), "missing {want:?} in {e}");
    }
    // ... and MIMLAB_DATA is the second place looked at.
    let data = checkout.join("data");
    let out = mimlab_in(cwd, &[("MIMLAB_DATA", data.to_str().unwrap())], &bad);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A SimMIM run is not resumed by finetune; a batch larger than the data is named.
    let run_s = run.to_str().unwrap();
    let e = err(&["finetune", "--resume", run_s]);
    assert!(
        e.contains("that run was written by `simmim` (mimlab pretrain); `mimlab finetune` resumes only its own `classify`/`detect`/`segment` runs (to start from that run's weights, pass it to --init)"),
        "{e}"
    );
    let mut big = base.to_vec();
    big.extend(["--set", "train.batch_size=100"]);
    let out = mimlab_in(cwd, &[], &big);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        e.contains("train.batch_size = 100 is larger than the train split (64 samples"),
        "{e}"
    );
}

#[test]
fn metrics_coco_prints_the_12_stats_of_pycocotools() {
    let fx = "tests/fixtures/coco";
    let (gt, dt) = (
        format!("{fx}/non_contiguous.gt.json"),
        format!("{fx}/non_contiguous.dt.json"),
    );
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{fx}/non_contiguous.expected.json")).unwrap(),
    )
    .unwrap();
    let names = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];
    let out = ok(&["metrics", "coco", "--gt", &gt, "--dt", &dt]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let obj = j.as_object().unwrap();
    assert_eq!(obj.len(), 12, "{out}");
    for (i, n) in names.iter().enumerate() {
        let want = f64::from_bits(expected["stats_bits"][i].as_u64().unwrap());
        let got = obj[*n].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{n}: {got} vs {want}");
        assert!(got == -1.0 || (0.0..=1.0).contains(&got), "{n}: {got}");
    }
    let out = ok(&["metrics", "coco", "--gt", &gt, "--dt", &dt, "--per-class"]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let pc = j["per_class"].as_array().unwrap();
    let ids: Vec<u64> = pc.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [5, 17, 90]);
    assert_eq!(pc[2]["name"], "toothbrush");
    for (c, w) in pc.iter().zip(expected["per_class"].as_array().unwrap()) {
        let want = f64::from_bits(w["AP_bits"].as_u64().unwrap());
        assert!((c["AP"].as_f64().unwrap() - want).abs() < 1e-12, "{c}");
    }
    // Errors name the file at fault.
    let e = err(&["metrics", "coco", "--gt", &gt, "--dt", "no/such.json"]);
    assert!(e.contains("no/such.json"), "{e}");
    let e = err(&[
        "metrics",
        "coco",
        "--gt",
        &gt,
        "--dt",
        &format!("{fx}/crowd.dt.json"),
    ]);
    assert!(e.contains("crowd.dt.json") && e.contains("image id"), "{e}");
}

/// `mimlab metrics miou` prints mmseg's metrics of a fixture folder (tests/fixtures/miou, from
/// scripts/make_miou_fixtures.py), and each bad input is an error naming the file at fault.
#[test]
fn metrics_miou_prints_mmseg_metrics_and_names_bad_files() {
    let fx = "tests/fixtures/miou/random_reduce_zero_label";
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{fx}/expected.json")).unwrap())
            .unwrap();
    let (gt, pred) = (format!("{fx}/gt"), format!("{fx}/pred"));
    let base = ["metrics", "miou", "--gt", &gt, "--pred", &pred];
    let mut args = base.to_vec();
    args.extend(["--num-classes", "12", "--reduce-zero-label"]);
    let out = ok(&args);
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let obj = j.as_object().unwrap();
    let mut keys: Vec<&String> = obj.keys().collect();
    keys.sort();
    assert_eq!(keys, ["Acc", "IoU", "aAcc", "mAcc", "mIoU"], "{out}");
    for k in ["mIoU", "aAcc", "mAcc"] {
        let (g, w) = (j[k].as_f64().unwrap(), expected[k].as_f64().unwrap());
        assert!((g - w).abs() < 1e-12, "{k}: {g} vs {w}");
    }
    assert_eq!(j["IoU"].as_array().unwrap().len(), 12);
    // without the label shift, stored label 12 is out of range for 12 classes
    let mut args = base.to_vec();
    args.extend(["--num-classes", "12"]);
    let e = err(&args);
    assert!(
        e.contains("random_reduce_zero_label/gt/") && e.contains("label value 12"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |p: &std::path::Path, w: u32, h: u32| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::GrayImage::new(w, h).save(p).unwrap();
    };
    write(&d.join("gt/a.png"), 4, 3);
    write(&d.join("pred/b.png"), 4, 3);
    let (g, p) = (d.join("gt"), d.join("pred"));
    let (g, p) = (g.to_str().unwrap(), p.to_str().unwrap());
    let args = [
        "metrics",
        "miou",
        "--gt",
        g,
        "--pred",
        p,
        "--num-classes",
        "2",
    ];
    let e = err(&args);
    assert!(e.contains("pred/a.png: no prediction"), "{e}");
    write(&d.join("pred/a.png"), 3, 4);
    let e = err(&args);
    assert!(
        e.contains("pred/a.png is 3x4 but its label map") && e.contains("4x3"),
        "{e}"
    );
    write(&d.join("pred/a.png"), 4, 3);
    let out = mimlab(&args);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // all-zero maps: class 0 is perfect, class 1 has no pixels on either side
    assert_eq!(j["mIoU"].as_f64(), Some(1.0));
    assert_eq!(j["IoU"][1], serde_json::Value::Null);
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("1 prediction(s)") && note.contains("b.png"),
        "{note}"
    );
}

/// `mimlab model list`: a header naming the MAC convention, one row per preset, and
/// swinv2_tiny_window8_256 with timm's exact parameter count and 5.94 GMACs (timm's card: 5.96).
#[test]
fn model_list_prints_every_preset_with_params_and_macs() {
    let text = ok(&["model", "list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("1 multiply-add = 1 FLOP")
            && lines[0].contains("timm")
            && !lines[0].contains("  "),
        "{text}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        ["preset", "img", "window", "embed", "depths", "heads", "params", "GMACs"]
    );
    assert_eq!(
        lines.len(),
        2 + mimlab_models::swin_v2::PRESETS.len(),
        "{text}"
    );
    let tiny: Vec<&str> = lines
        .iter()
        .find(|l| l.starts_with("swinv2_tiny_window8_256 "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        tiny,
        [
            "swinv2_tiny_window8_256",
            "256",
            "8",
            "96",
            "2,2,6,2",
            "3,6,12,24",
            "28347154",
            "5.94"
        ]
    );
}

/// Every flag or argument that takes a run folder or a weights file shows it as `RUN_DIR|FILE`.
#[test]
fn weights_flags_show_run_dir_or_file_in_their_help() {
    for (cmd, flag) in [
        (&["finetune", "--help"][..], "--init <RUN_DIR|FILE>"),
        (&["probe", "--help"][..], "--init <RUN_DIR|FILE>"),
        (&["distill", "--help"][..], "--teacher <RUN_DIR|FILE>"),
        (&["eval", "--help"][..], "--weights <RUN_DIR|FILE>"),
        (&["model", "run", "--help"][..], "--weights <RUN_DIR|FILE>"),
        (&["model", "convert", "--help"][..], "<RUN_DIR|FILE>"),
    ] {
        let text = ok(cmd);
        assert!(text.contains(flag), "{cmd:?}: no `{flag}` in\n{text}");
    }
}

/// Tensors of a safetensors file and its `config` metadata.
fn load_with_config(
    p: &Path,
) -> (
    std::collections::HashMap<String, candle_core::Tensor>,
    Option<String>,
) {
    let t = candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let config = mimlab_models::checkpoint::weights_metadata(p)
        .unwrap()
        .remove("config");
    (t, config)
}

/// Same keys, dtypes and bytes.
fn assert_same_tensors(
    a: &std::collections::HashMap<String, candle_core::Tensor>,
    b: &std::collections::HashMap<String, candle_core::Tensor>,
    what: &str,
) {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}");
    for (k, v) in a {
        assert_eq!(v.dtype(), b[k].dtype(), "{what} {k}");
        let f = |t: &candle_core::Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(f(v), f(&b[k]), "{what} {k}");
    }
}

/// `mimlab model convert`: the official fixture (safetensors with its config metadata, and the
/// `.pth` with the architecture given by --set) -> timm layout is the timm fixture tensor for
/// tensor; timm -> official -> timm gives it back (model B, 7-class head); a converted file
/// carries its config and `model run` on it gives PyTorch's outputs.
#[test]
fn model_convert_reproduces_the_timm_fixture_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (timm_a, _) = load_with_config(Path::new("tests/fixtures/swinv2_a.timm.safetensors"));
    ok(&[
        "model",
        "convert",
        "tests/fixtures/swinv2_a.official.safetensors",
        &d("a_from_st.safetensors"),
        "--layout",
        "timm",
    ]);
    let (got, config) = load_with_config(Path::new(&d("a_from_st.safetensors")));
    assert_same_tensors(&got, &timm_a, "official safetensors -> timm");
    let cfg: mimlab_models::swin_v2::SwinV2Config =
        serde_json::from_str(&config.expect("config metadata")).unwrap();
    assert_eq!((cfg.img_size, cfg.embed_dim, cfg.num_classes), (32, 16, 0));

    // a .pth has no architecture: without one the error says how to give it
    let e = err(&[
        "model",
        "convert",
        "tests/fixtures/swinv2_a.official.pth",
        &d("x.safetensors"),
    ]);
    assert!(
        e.contains("swinv2_a.official.pth") && e.contains("--set model.preset"),
        "{e}"
    );
    let sets = [
        "model.img_size=32",
        "model.patch_size=4",
        "model.embed_dim=16",
        "model.depths=[2,2]",
        "model.num_heads=[1,2]",
        "model.window_size=4",
    ];
    let mut args = vec![
        "model",
        "convert",
        "tests/fixtures/swinv2_a.official.pth",
        "--layout",
        "timm",
    ];
    let out_pth = d("a_from_pth.safetensors");
    args.push(&out_pth);
    for s in &sets {
        args.extend(["--set", *s]);
    }
    ok(&args);
    let (got, _) = load_with_config(Path::new(&out_pth));
    assert_same_tensors(&got, &timm_a, "official .pth -> timm");

    // model B (3 stages, head, pretrained windows): timm -> official -> timm
    let (timm_b, _) = load_with_config(Path::new("tests/fixtures/swinv2_b.timm.safetensors"));
    let (official_b, _) =
        load_with_config(Path::new("tests/fixtures/swinv2_b.official.safetensors"));
    ok(&[
        "model",
        "convert",
        "tests/fixtures/swinv2_b.timm.safetensors",
        &d("b.official.safetensors"),
        "--layout",
        "official",
    ]);
    let (b_off, _) = load_with_config(Path::new(&d("b.official.safetensors")));
    let mut k1: Vec<&String> = b_off.keys().collect();
    let mut k2: Vec<&String> = official_b.keys().collect();
    k1.sort();
    k2.sort();
    assert_eq!(k1, k2, "the official fixture's keys, buffers included");
    ok(&[
        "model",
        "convert",
        &d("b.official.safetensors"),
        &d("b.timm.safetensors"),
        "--layout",
        "timm",
    ]);
    let (b_back, config) = load_with_config(Path::new(&d("b.timm.safetensors")));
    assert_same_tensors(&b_back, &timm_b, "timm -> official -> timm");
    let cfg: mimlab_models::swin_v2::SwinV2Config = serde_json::from_str(&config.unwrap()).unwrap();
    assert_eq!(
        (cfg.num_classes, cfg.pretrained_window_sizes.clone()),
        (7, vec![6, 0, 3])
    );

    // the converted official file runs in mimlab with PyTorch's logits
    let io = "tests/fixtures/swinv2_b.io.safetensors";
    let reference = candle_core::safetensors::load(io, &candle_core::Device::Cpu).unwrap();
    let out = d("b.out.safetensors");
    let b_sets = [
        "model.img_size=32",
        "model.patch_size=2",
        "model.num_classes=7",
        "model.embed_dim=12",
        "model.depths=[2,2,2]",
        "model.num_heads=[1,2,2]",
        "model.window_size=8",
        "model.pretrained_window_sizes=[6,0,3]",
    ];
    let weights = d("b.official.safetensors");
    let mut args = vec![
        "model",
        "run",
        "--weights",
        &weights,
        "--input",
        io,
        "--output",
        &out,
    ];
    for s in &b_sets {
        args.extend(["--set", *s]);
    }
    ok(&args);
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let want = &reference["official.logits"];
    let diff = (&got["logits"] - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff / scale < 1e-4, "relative error {}", diff / scale);
}

/// `model run --weights` takes the official `.pth` directly and gives the outputs of its
/// safetensors twin exactly.
#[test]
fn model_run_takes_a_pth_and_matches_its_safetensors_twin() {
    let dir = tempfile::tempdir().unwrap();
    let io = "tests/fixtures/swinv2_a.io.safetensors";
    let run = |weights: &str, name: &str| {
        let out = dir.path().join(name);
        ok(&[
            "model",
            "run",
            "--set",
            "model.img_size=32",
            "--set",
            "model.embed_dim=16",
            "--set",
            "model.depths=[2,2]",
            "--set",
            "model.num_heads=[1,2]",
            "--set",
            "model.window_size=4",
            "--set",
            "model.num_classes=0",
            "--weights",
            weights,
            "--input",
            io,
            "--output",
            out.to_str().unwrap(),
        ]);
        candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()
    };
    let a = run("tests/fixtures/swinv2_a.official.pth", "pth.safetensors");
    let b = run(
        "tests/fixtures/swinv2_a.official.safetensors",
        "st.safetensors",
    );
    assert_same_tensors(&a, &b, ".pth vs safetensors outputs");
    assert!(a.contains_key("features") && a.contains_key("pre_logits"));
}

/// Detection end to end on digits-det (generated on first use): a few FCOS steps, COCO AP at the
/// evaluation (metrics.jsonl, TensorBoard), the best checkpoint by AP50, the reports and the
/// picture, then `mimlab eval` of the best checkpoint gives the same 12 numbers.
#[test]
fn detection_finetune_then_eval_on_digits_det() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let out = format!("run.output_dir={}", dir.path().display());
    let sets = [
        out.as_str(),
        "run.name=det",
        "train.max_steps=3",
        "train.batch_size=4",
        "data.max_samples=12",
        "run.eval_every_epochs=1",
        "run.image_every=0",
    ];
    let args = finetune_with("configs/detect/swinv2_nano_digits_det.yaml", &sets);
    ok(&args);
    let run = dir.path().join("det");
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let fin = read(run.join("eval/final.json"));
    let names = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];
    for k in names {
        let v = fin["coco"][k].as_f64().unwrap();
        assert!(v == -1.0 || (0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(fin["coco"]["per_class"].as_array().unwrap().len(), 10);
    let dets = read(run.join("eval/detections.json"));
    for d in dets.as_array().unwrap() {
        let id = d["image_id"].as_u64().unwrap();
        let c = d["category_id"].as_u64().unwrap();
        assert!((1..=12).contains(&id) && (1..=10).contains(&c), "{d}");
        assert_eq!(d["bbox"].as_array().unwrap().len(), 4);
    }
    let rows = mimlab_engine::log::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let eval = rows
        .iter()
        .find(|r| r["split"] == "eval")
        .expect("an eval row");
    assert_eq!(eval["step"], 3);
    assert_eq!(eval["AP50"], fin["coco"]["AP50"]);
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/best")).unwrap(),
        "step_3\n"
    );
    let png = image::open(run.join("pictures/detections_step3.png")).unwrap();
    assert!(
        png.width() >= 2 * 256 && png.height() >= 4 * 256,
        "{}x{}",
        png.width(),
        png.height()
    );

    let run_s = run.to_str().unwrap();
    ok(&["eval", "--weights", run_s, "--step", "best"]);
    let again = read(run.join("eval/eval.json"));
    for k in names {
        assert_eq!(again["coco"][k], fin["coco"][k], "{k}");
    }
}

/// `run.cpu_ranks: 2`: a detection finetune as two in-process data-parallel ranks writes one
/// run folder (world.jsonl: 2 "threads" ranks), one progress bar and one `done` line, and its
/// final evaluation; the run resumes as one rank to a later step.
#[test]
fn detection_finetune_as_two_cpu_ranks_then_resume_as_one() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let out = format!("run.output_dir={}", dir.path().display());
    let sets = [
        out.as_str(),
        "run.name=dp",
        "run.cpu_ranks=2",
        "run.threads=2",
        "run.log_every=1",
        "train.max_steps=3",
        "train.batch_size=4",
        "data.max_samples=12",
        "run.eval_every_epochs=0",
        "run.best_metric=null",
        "run.image_every=0",
    ];
    let args = finetune_with("configs/detect/swinv2_nano_digits_det.yaml", &sets);
    let run_out = mimlab(&args);
    let stdout = String::from_utf8_lossy(&run_out.stdout);
    let stderr = String::from_utf8_lossy(&run_out.stderr);
    assert!(run_out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("done: 3 steps").count(), 1, "{stdout}");
    let bars = stderr
        .lines()
        .filter(|l| l.contains("done 3/3 steps"))
        .count();
    assert_eq!(bars, 1, "one progress bar per run:\n{stderr}");
    let run = dir.path().join("dp");
    assert!(run.join("eval/final.json").exists());
    let world = std::fs::read_to_string(run.join("world.jsonl")).unwrap();
    assert_eq!(
        world,
        "{\"backend\":\"threads\",\"step\":0,\"world_size\":2}\n"
    );

    let run_s = run.to_str().unwrap();
    ok(&[
        "finetune",
        "--resume",
        run_s,
        "--set",
        "run.cpu_ranks=1",
        "--set",
        "train.max_steps=5",
    ]);
    let world = std::fs::read_to_string(run.join("world.jsonl")).unwrap();
    assert!(
        world.ends_with("{\"backend\":\"local\",\"step\":3,\"world_size\":1}\n"),
        "{world}"
    );
    let rows = mimlab_engine::log::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let last = rows.iter().rev().find(|r| r["split"] == "train").unwrap();
    assert_eq!(last["step"], 5);
}

#[test]
fn bench_quick_runs_the_segmentation_rows_at_batch_8() {
    // the segmentor of configs/segment/swinv2_nano_digits_seg.yaml with either decode head
    let out = bench_quick(&[
        "--filter",
        "segment/nano_upernet/train img=128 batch=8",
        "--filter",
        "segment/nano_segformer/inference img=128 batch=8",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 2, "{out}");
    for (line, name) in lines[1..].iter().zip([
        "segment/nano_upernet/train",
        "segment/nano_segformer/inference",
    ]) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[..3], [name, "8", "128"], "{out}");
        let images_per_s: f64 = cols[cols.len() - 2].parse().unwrap();
        assert!(images_per_s > 0.0, "{out}");
    }
}

/// Segmentation end to end on digits-seg: finetune with mIoU evaluations and pictures, `eval` on
/// the best checkpoint with the same numbers and the predicted label maps, which `metrics miou`
/// scores to exactly the same mIoU against the ground-truth files.
#[test]
fn segmentation_finetune_eval_and_metrics_agree_on_digits_seg() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let out = format!("run.output_dir={}", dir.path().display());
    let sets = [
        out.as_str(),
        "run.name=seg",
        "train.max_steps=3",
        "train.batch_size=4",
        "data.max_samples=12",
        "run.eval_every_epochs=1",
        "run.image_every=0",
    ];
    let args = finetune_with("configs/segment/swinv2_nano_digits_seg.yaml", &sets);
    ok(&args);
    let run = dir.path().join("seg");
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let fin = read(run.join("eval/final.json"));
    assert_eq!(fin["IoU"].as_array().unwrap().len(), 11);
    assert_eq!(fin["classes"][0], "background");
    let miou = fin["mIoU"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&miou), "{fin}");
    let rows = mimlab_engine::log::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let eval = rows
        .iter()
        .find(|r| r["split"] == "eval")
        .expect("an eval row");
    assert_eq!(eval["step"], 3);
    assert_eq!(eval["mIoU"], fin["mIoU"]);
    let png = image::open(run.join("pictures/segmentation_step3.png")).unwrap();
    assert!(
        png.width() >= 3 * 256 && png.height() >= 4 * 256,
        "{}x{}",
        png.width(),
        png.height()
    );

    let run_s = run.to_str().unwrap();
    ok(&["eval", "--weights", run_s, "--step", "best"]);
    let again = read(run.join("eval/eval.json"));
    for k in ["mIoU", "aAcc", "mAcc", "IoU", "Acc"] {
        assert_eq!(again[k], fin[k], "{k}");
    }
    // the 12 evaluated ground-truth maps beside their 12 predictions
    let gt = dir.path().join("gt");
    std::fs::create_dir_all(&gt).unwrap();
    let pred = run.join("eval/pred");
    let mut n = 0;
    for e in std::fs::read_dir(&pred).unwrap() {
        let name = e.unwrap().file_name();
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/digits-det/masks/val")
            .join(&name);
        std::fs::copy(&src, gt.join(&name)).unwrap();
        n += 1;
    }
    assert_eq!(n, 12);
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "metrics",
        "miou",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
        "--num-classes",
        "11",
    ]))
    .unwrap();
    for k in ["mIoU", "aAcc", "mAcc", "IoU", "Acc"] {
        assert_eq!(j[k], fin[k], "{k}");
    }
}

/// `mimlab sweep` (src/sweep): a 2-point x 2-seed grid over a pretraining and a probe of it.
/// Killed (with its whole process group, as Ctrl-C does) once the first stage has finished and
/// restarted, it skips what finished (those stages' logs get no new line) and completes; then
/// `results.csv` holds a row per cell with both stages' results, `results.md` the mean ± sd of
/// each grid point over the 2 seeds, and a plot per result; a changed sweep file under the same
/// name is refused.
#[test]
fn sweep_runs_a_grid_resumes_after_a_kill_and_tabulates() {
    use std::os::unix::process::CommandExt;
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let tiny = "model.embed_dim=16, 'model.depths=[1,1]', 'model.num_heads=[1,2]', \
                'model.pretrained_window_sizes=[0,0]', data.max_samples=128, data.num_workers=0, \
                train.batch_size=16, run.threads=1, run.log_every=1";
    let sweep = format!(
        "name: t\noutput_dir: {out}\nseeds: [0, 1]\ngrid:\n  simmim.mask_ratio: [0.3, 0.6]\n\
         stages:\n  - name: pre\n    command: pretrain\n    \
         config: {root}/configs/simmim/swinv2_nano_fmnist.yaml\n    \
         set: [{tiny}, train.max_steps=4, run.image_every=0, simmim.num_pictures=0]\n  \
         - name: probe\n    command: probe\n    \
         config: {root}/configs/finetune/swinv2_nano_fmnist.yaml\n    init: pre\n    \
         grid: false\n    set: [{tiny}, finetune.probe_epochs=2]\n    fractions: [1.0]\n",
        out = dir.path().display()
    );
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, &sweep).unwrap();
    let file_s = file.to_str().unwrap();
    let t = dir.path().join("t");
    let cells = t.join("cells");

    // start, wait for the first finished stage, kill the sweep and its children
    let mut child = Command::new(env!("CARGO_BIN_EXE_mimlab"))
        .args(["sweep", "--config", file_s])
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let first = cells.join("p00-s0/pre.done.json");
    let t0 = std::time::Instant::now();
    while !first.exists() {
        assert!(
            t0.elapsed().as_secs() < 300,
            "no stage finished in 5 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap();
    let log = cells.join("p00-s0/pre.log");
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();

    let out = ok(&["sweep", "--config", file_s]);
    assert!(out.contains("| point | simmim.mask_ratio |"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        lines,
        "the finished stage ran again"
    );
    let csv = std::fs::read_to_string(t.join("results.csv")).unwrap();
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (loss, knn) = (col("pre.train_loss"), col("probe.knn_top1@1"));
    assert_eq!(&header[..3], ["point", "seed", "simmim.mask_ratio"]);
    let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let l: f64 = r[loss].parse().unwrap();
        let k: f64 = r[knn].parse().unwrap();
        assert!(
            l.is_finite() && l > 0.0 && (0.0..=100.0).contains(&k),
            "{r:?}"
        );
    }
    // seeds differ, grid points differ
    assert_ne!(rows[0][loss], rows[1][loss]);
    assert_eq!((rows[2][0], rows[2][1], rows[2][2]), ("1", "0", "0.6"));
    let md = std::fs::read_to_string(t.join("results.md")).unwrap();
    assert!(md.contains("| 0 | 0.3 |") && md.contains("(2) |"), "{md}");
    for f in ["plot_probe.knn_top1_1.png", "avgdist_probe.knn_top1_1.png"] {
        let png = std::fs::read(t.join(f)).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{f}");
    }
    // each point's AvgDist (the grid varies the mask) is `mimlab avgdist`'s for its mask
    let table = ok(&[
        "avgdist",
        "--img-size",
        "32",
        "--mask-patch-sizes",
        "8",
        "--ratios",
        "0.3,0.6",
        "--format",
        "csv",
    ]);
    let want: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    let ad = col("avgdist");
    for (r, w) in rows.iter().zip([want[0], want[0], want[1], want[1]]) {
        let (got, w): (f64, f64) = (r[ad].parse().unwrap(), w.parse().unwrap());
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
    }

    // the same name with another grid is another sweep
    std::fs::write(&file, sweep.replace("[0.3, 0.6]", "[0.3, 0.9]")).unwrap();
    let e = err(&["sweep", "--config", file_s]);
    assert!(e.contains("holds another sweep"), "{e}");
}

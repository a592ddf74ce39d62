//! Recipe, model stage: `mimlab model convert`. The backbone (and the classifier head when the
//! weights carry one) of anything a weights flag accepts (a run folder, a mimlab checkpoint
//! with its objective's prefix, an official `.pth`, a timm safetensors) loaded strictly into a
//! Swin-V2 of its architecture, then written in one key layout (official / timm / mimlab) as a
//! safetensors file with the model config JSON in its metadata (`config`, like the fixtures).
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_engine::run_dir::resolve_init;
use mimlab_engine::trainer::checkpoint::varmap_tensors;
use mimlab_models::checkpoint::{
    read_weights, remap_from_mimlab, save_weights, weights_metadata, Layout,
};
use mimlab_models::pretrained::{load_backbone_tensors, Head};
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

use crate::backbone::{backbone_prefix, run_model_section};

/// Where the architecture of the converted weights came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// `--config` / `--set` on the command line.
    Given,
    /// The `config.yaml` of the run the weights belong to.
    RunConfig(std::path::PathBuf),
    /// The `config` metadata of the safetensors file.
    Metadata,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Given => write!(f, "--config / --set"),
            Self::RunConfig(p) => write!(f, "{}", p.display()),
            Self::Metadata => write!(f, "the file's `config` metadata"),
        }
    }
}

/// What [`convert_weights`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The weights file read (a run folder's newest checkpoint).
    pub weights: std::path::PathBuf,
    /// The prefix its backbone sat under ("" for none).
    pub prefix: &'static str,
    /// Its key layout.
    pub from: Layout,
    /// The architecture written into the metadata (`num_classes` = the head's rows, 0 for none).
    pub config: SwinV2Config,
    /// Where that architecture came from.
    pub config_source: ConfigSource,
    /// Tensors written.
    pub tensors: usize,
}

/// The architecture of `weights`: `given` if any, else its run's `config.yaml`, else the
/// `config` JSON in its safetensors metadata.
fn architecture(
    given: Option<&SwinV2Config>,
    run_config: Option<&Path>,
    weights: &Path,
) -> Result<(SwinV2Config, ConfigSource)> {
    if let Some(c) = given {
        return Ok((c.clone(), ConfigSource::Given));
    }
    if let Some(p) = run_config {
        return Ok((
            run_model_section(p)?,
            ConfigSource::RunConfig(p.to_path_buf()),
        ));
    }
    if let Some(json) = weights_metadata(weights)?.get("config") {
        let c: SwinV2Config = serde_json::from_str(json)
            .with_context(|| format!("{}: the `config` metadata", weights.display()))?;
        return Ok((c.resolved()?, ConfigSource::Metadata));
    }
    bail!(
        "{}: no run config.yaml beside it and no `config` metadata to read the architecture \
         from; pass it with --config FILE or --set model.preset=NAME (and any other model.* key)",
        weights.display()
    )
}

/// Converts the weights at `input` (run folder or weights file of any format and layout) to
/// `layout` and writes them to `out` (safetensors, atomically). `given`: the architecture from
/// the command line, else it is read from the run or the file. The head is kept when the
/// weights have one (`num_classes` set from its rows); the strict load names any tensor that
/// does not fit the architecture. MoE models exist only in the mimlab layout.
pub fn convert_weights(
    input: &Path,
    given: Option<&SwinV2Config>,
    out: &Path,
    layout: Layout,
) -> Result<ConvertReport> {
    let src = resolve_init(input)?;
    let (mut cfg, config_source) = architecture(given, src.run_config.as_deref(), &src.weights)?;
    let tensors = read_weights(&src.weights)?;
    let keys: Vec<&String> = tensors.keys().collect();
    let prefix = backbone_prefix(&keys);
    let from = mimlab_models::checkpoint::detect_layout(
        keys.iter().filter_map(|k| k.strip_prefix(prefix)),
    );
    let head = ["head.weight", "head.fc.weight"]
        .iter()
        .find_map(|h| tensors.get(&format!("{prefix}{h}")));
    cfg.num_classes = match head {
        Some(w) => w.dim(0)?,
        None => 0,
    };
    // the per-block CPB tables of the official / timm layouts (a shared one is copied in)
    cfg.shared_cpb = false;
    ensure!(
        layout == Layout::Mimlab || !cfg.moe.enabled(),
        "{}: an MoE model has no {layout:?} layout (timm and the official code have no experts); \
         convert with --layout mimlab",
        src.weights.display()
    );
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
    SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
    let head_mode = if cfg.num_classes > 0 {
        Head::Load
    } else {
        Head::Reinit
    };
    load_backbone_tensors(&varmap, tensors, prefix, head_mode)
        .with_context(|| format!("loading {}", src.weights.display()))?;
    let converted = remap_from_mimlab(varmap_tensors(&varmap), layout, &cfg)?;
    let layout_name = format!("{layout:?}").to_lowercase();
    let metadata = HashMap::from([
        ("config".to_string(), serde_json::to_string(&cfg)?),
        ("layout".to_string(), layout_name),
        (
            "converted_from".to_string(),
            src.weights.display().to_string(),
        ),
    ]);
    save_weights(out, &converted, metadata)?;
    Ok(ConvertReport {
        weights: src.weights,
        prefix,
        from,
        config: cfg,
        config_source,
        tensors: converted.len(),
    })
}

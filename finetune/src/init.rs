//! Recipe, model stage: a downstream model started from a pretrained run or weights file
//! (`finetune.init`, `--init`): the architecture checked against the run's and its windows
//! carried over.
use std::path::Path;

use anyhow::{Context, Result};
use mimlab_engine::run_dir::{resolve_init, InitSource};
use mimlab_models::pretrained::adapt_to_pretrained;
use mimlab_models::swin_v2::SwinV2Config;
use mimlab_pretrain::backbone::run_model_section;

/// `finetune.init` resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Init {
    /// The weights (and the run's config.yaml, if any).
    pub source: InitSource,
    /// `model.pretrained_window_sizes` carried over from the pretraining run; None when the
    /// weights are not inside a run folder (the model section is then taken as is).
    pub pretrained_window_sizes: Option<Vec<usize>>,
}

/// Resolves `path` (run folder or weights file), checks that `target` has the architecture of
/// the run the weights come from and carries its windows over ([`adapt_to_pretrained`]),
/// printing each change.
pub fn prepare_init(path: &Path, target: &SwinV2Config) -> Result<Init> {
    let source = resolve_init(path).context("finetune.init")?;
    let Some(cfg) = &source.run_config else {
        mimlab_engine::rank0_eprintln!(
            "init: {} is not inside a run folder; the model section is taken as is",
            source.weights.display()
        );
        return Ok(Init {
            source,
            pretrained_window_sizes: None,
        });
    };
    let pre = run_model_section(cfg)?;
    let mut target = target.clone();
    let notes = adapt_to_pretrained(&mut target, &pre)
        .with_context(|| format!("finetune.init {}", path.display()))?;
    for n in notes {
        mimlab_engine::rank0_eprintln!("init: {n}");
    }
    Ok(Init {
        source,
        pretrained_window_sizes: Some(target.pretrained_window_sizes),
    })
}

/// Loads a pretrained backbone (any run folder's checkpoint or an official / timm file, the layout
/// detected as for classification) into the variables of `varmap` named `backbone.*` (a
/// detector's or segmentor's); every backbone tensor must load, the other variables stay at their
/// init.
pub fn load_backbone_into(
    varmap: &candle_nn::VarMap,
    weights: &Path,
) -> Result<mimlab_models::checkpoint::LoadReport> {
    // The backbone's variables under their own names (the same `Var`s: loading sets them).
    let sub = candle_nn::VarMap::new();
    {
        // Invariant: a VarMap mutex is only poisoned if a thread panicked holding it.
        let all = varmap.data().lock().expect("varmap mutex poisoned");
        let mut own = sub.data().lock().expect("varmap mutex poisoned");
        for (k, v) in all.iter() {
            if let Some(rest) = k.strip_prefix("backbone.") {
                own.insert(rest.to_string(), v.clone());
            }
        }
    }
    mimlab_pretrain::backbone::load_backbone_weights(
        &sub,
        weights,
        mimlab_models::pretrained::Head::Reinit,
    )
}

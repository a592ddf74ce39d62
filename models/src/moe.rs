//! Mixture-of-experts feed-forward layers (Swin-MoE, Hwang et al. 2022 / tutel), placed in Swin-V2
//! blocks in place of the dense MLP (architecture.md section 6).
//!
//! Routing follows `tutel/impls/moe_layer.py` + `fast_dispatch.py` @ aa11f38: fp32 gate
//! `Linear(C, E, no bias)`, gate noise `gate_noise * N(0,1) / E` in training, softmax, top-k,
//! batch-prioritized routing (BPR) order, capacity `k * int(capacity_factor * ceil(S / E))` over
//! the S = B*H*W tokens of the batch, dropped tokens give a zero MoE output (the block output is then
//! the residual only), the gate is applied after the expert. The auxiliary loss is tutel's
//! `load_importance_loss` computed exactly as the reference code does (see [`load_importance_loss`]).
//! Evaluation disables the gate noise only: capacity (`eval_capacity_factor`) and BPR still apply,
//! so eval outputs depend on batch composition, as in the reference.
//!
//! Dispatch is sparse: routing decisions are made on the CPU from the `[S, E]` scores, the kept
//! assignments (N <= top_k x S token-expert pairs) are laid out in one `[N, .]` buffer sorted by
//! expert, with no padding ([`SortedRows`]); the routed rows are gathered and every expert runs
//! fc1 + GELU on its own rows in one node ([`experts_fc1_gelu`]), fc2 through [`grouped_linear`]
//! (a gemm per row segment), and [`experts_combine`] scales the outputs by their gates and adds
//! each token's rows into its output row (a token with no kept assignment gets zeros). The
//! experts cost the N token-expert evaluations whatever the number of
//! experts; only the router (`[S, E]` logits, softmax, top-k) grows with E.
//!
//! Checkpoint keys (Swin-MoE layout, under a block's `mlp.`): `_moe_layer.gates.0.wg.weight [E, C]`,
//! `_moe_layer.experts.batched_fc1_w [E, hC, C]`, `batched_fc1_bias [E, 1, hC]`,
//! `batched_fc2_w [E, hC, C]` (transposed, as the reference stores it), `batched_fc2_bias [E, 1, C]`.
//! Swin-MoE gate and expert tensors of the same shape therefore load into these layers. Not
//! supported: the Swin-MoE backbone itself (V1, pre-norm; its attention/norm tensors do not fit a
//! Swin-V2 block), per-rank `*.pth.rank{r}` files (merge the experts of all ranks along dim 0 first;
//! sharded experts `NUM_LOCAL_EXPERTS < 0` must be concatenated along the hidden dim), the cosine
//! router, and the GShard loss. Differences from the reference expert: dropout inside the expert is
//! `model.drop_rate` (the reference has `MOE_DROP`), and the fc2 bias is trainable (the reference
//! freezes it at 0 because its dense MLP has no fc2 bias; a Swin-V2 MLP has one).
//!
//! Contract (values, no side channel): a block's forward returns its layer's [`MoeStats`], and the
//! backbone's forward returns all of them in block order as a [`MoeAux`] with its output (a field
//! of the features, the second value of the logits). An objective hands `moe.aux_losses()?` to
//! the trainer in `StepOutput::aux` (a required field, so it cannot be forgotten) and never adds it
//! itself: the trainer adds `aux_loss_weight * sum over MoE layers` to the task loss and logs the
//! metrics `moe_aux`, `moe_drop`, `moe_load_l{i}_max` (see [`summarize`]). A dense model returns
//! no stats and no loss; a frozen model (a distillation teacher) drops its `MoeAux`.
use std::sync::Arc;

use crate::ops::{experts_combine, experts_fc1_gelu, grouped_linear, SortedRows, WeightLayout};
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use mimlab_engine::rng::SharedRng;
use mimlab_engine::trainer::AuxLoss;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

// ------------------------------------------------------------------------------------------------
// Config
// ------------------------------------------------------------------------------------------------

/// The `model.moe:` section. `num_experts = 0` (the default) keeps every block dense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Experts per MoE layer; 0 = no MoE anywhere.
    pub num_experts: usize,
    /// Experts per token (1 or 2; reference `TOP_VALUE`).
    pub top_k: usize,
    /// Capacity factor in training (reference `CAPACITY_FACTOR`).
    pub capacity_factor: f64,
    /// Capacity factor in evaluation.
    pub eval_capacity_factor: f64,
    /// Gate noise scale in training: logits + gate_noise * N(0,1) / E (0 = none).
    pub gate_noise: f64,
    /// Renormalize the top-k gates to sum to 1 (only matters for top_k > 1).
    pub normalize_gate: bool,
    /// Batch-prioritized routing: capacity slots go to the most confident tokens first.
    pub batch_prioritized: bool,
    /// Weight of the summed auxiliary load-balancing loss.
    pub aux_loss_weight: f64,
    /// Per stage, the indices of its MoE blocks, like the reference `MOE_BLOCKS` (`[-1]` or `[]` =
    /// none). Empty (the default) = every odd (shifted) block of the last two stages, which is the
    /// reference placement for the 4-stage models (`[[-1], [-1], [1, 3, ..., 17], [1]]`).
    pub blocks: Vec<Vec<i64>>,
}

impl Default for MoeConfig {
    fn default() -> Self {
        // Reference defaults (architecture.md 6), MoE off.
        Self {
            num_experts: 0,
            top_k: 1,
            capacity_factor: 1.25,
            eval_capacity_factor: 1.25,
            gate_noise: 1.0,
            normalize_gate: false,
            batch_prioritized: true,
            aux_loss_weight: 0.01,
            blocks: vec![],
        }
    }
}

impl MoeConfig {
    /// Whether any block is an MoE block.
    pub fn enabled(&self) -> bool {
        self.num_experts > 0
    }

    /// The derived default placement: every odd block of the last two stages.
    pub fn default_blocks(depths: &[usize]) -> Vec<Vec<i64>> {
        let n = depths.len();
        depths
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let v: Vec<i64> = if i + 2 >= n {
                    (1..d as i64).step_by(2).collect()
                } else {
                    vec![]
                };
                if v.is_empty() {
                    vec![-1]
                } else {
                    v
                }
            })
            .collect()
    }

    /// `blocks`, or the derived default when empty.
    pub fn effective_blocks(&self, depths: &[usize]) -> Vec<Vec<i64>> {
        if self.blocks.is_empty() {
            Self::default_blocks(depths)
        } else {
            self.blocks.clone()
        }
    }

    /// Whether block `block` of stage `stage` is an MoE block.
    pub fn is_moe_block(&self, depths: &[usize], stage: usize, block: usize) -> bool {
        self.enabled()
            && self
                .effective_blocks(depths)
                .get(stage)
                .is_some_and(|b| b.contains(&(block as i64)))
    }

    /// Number of MoE layers of a model with these `depths`.
    pub fn num_layers(&self, depths: &[usize]) -> usize {
        (0..depths.len())
            .map(|i| {
                (0..depths[i])
                    .filter(|&j| self.is_moe_block(depths, i, j))
                    .count()
            })
            .sum()
    }

    /// Checks that one MoE layer of width `dim` (MLP hidden size `hidden`) fits its f32 weights
    /// (gate and experts) in `mem` bytes; the error names `model.moe.num_experts`.
    pub fn check_size(&self, dim: usize, hidden: usize, mem: u64) -> Result<()> {
        let (d, h) = (dim as f64, hidden as f64);
        let bytes = self.num_experts as f64 * (d + 2.0 * d * h + h + d) * 4.0;
        ensure!(
            bytes <= mem as f64,
            "model.moe.num_experts: {} experts of {dim}x{hidden} MLPs need {:.1} GiB of weights in \
             one MoE layer, more than this machine's memory ({:.1} GiB)",
            self.num_experts,
            bytes / (1u64 << 30) as f64,
            mem as f64 / (1u64 << 30) as f64
        );
        Ok(())
    }

    /// Checks the section against the stage depths; errors name the `model.moe.*` key.
    pub fn validate(&self, depths: &[usize]) -> Result<()> {
        ensure!(
            self.top_k == 1 || self.top_k == 2,
            "model.moe.top_k: must be 1 or 2, got {}",
            self.top_k
        );
        if self.enabled() {
            ensure!(
                self.top_k <= self.num_experts,
                "model.moe.top_k: {} exceeds model.moe.num_experts {}",
                self.top_k,
                self.num_experts
            );
        }
        for (key, v) in [
            ("capacity_factor", self.capacity_factor),
            ("eval_capacity_factor", self.eval_capacity_factor),
        ] {
            ensure!(
                v.is_finite() && v > 0.0,
                "model.moe.{key}: must be > 0, got {v}"
            );
        }
        for (key, v) in [
            ("gate_noise", self.gate_noise),
            ("aux_loss_weight", self.aux_loss_weight),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "model.moe.{key}: must be >= 0, got {v}"
            );
        }
        if self.blocks.is_empty() {
            return Ok(());
        }
        ensure!(
            self.blocks.len() == depths.len(),
            "model.moe.blocks: has {} entries but model.depths has {}",
            self.blocks.len(),
            depths.len()
        );
        for (i, (b, &d)) in self.blocks.iter().zip(depths).enumerate() {
            if b.as_slice() == [-1] {
                continue;
            }
            for &j in b {
                if j < 0 || j as usize >= d {
                    bail!(
                        "model.moe.blocks[{i}]: block {j} is out of range (stage {i} has {d} \
                         blocks, indices 0..{d}; use [-1] for none)"
                    );
                }
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Routing (CPU, on the [S, E] scores)
// ------------------------------------------------------------------------------------------------

/// Expert capacity: `k * int(capacity_factor * ceil(S / E))` (tutel `extract_critical`).
pub fn capacity(tokens: usize, experts: usize, top_k: usize, capacity_factor: f64) -> usize {
    top_k * (capacity_factor * tokens.div_ceil(experts) as f64) as usize
}

/// Routing decisions of one MoE layer; assignment `a = token * k + choice`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per token (E).
    pub num_experts: usize,
    /// Choices per token (k).
    pub top_k: usize,
    /// Expert of each assignment, choices in descending score order: `[S * k]`.
    pub experts: Vec<usize>,
    /// Slot of each assignment in its expert's buffer (before dropping): `[S * k]`.
    pub locations: Vec<usize>,
    /// Slots per expert.
    pub capacity: usize,
}

impl Routing {
    /// Whether assignment `a` fits its expert's capacity.
    pub fn kept(&self, a: usize) -> bool {
        self.locations[a] < self.capacity
    }

    /// Fraction of the S*k assignments routed to each expert (before capacity).
    pub fn load(&self) -> Vec<f64> {
        let mut c = vec![0.0; self.num_experts];
        for &e in &self.experts {
            c[e] += 1.0;
        }
        let n = self.experts.len().max(1) as f64;
        c.iter().map(|v| v / n).collect()
    }

    /// Fraction of the S*k assignments dropped by the capacity.
    pub fn drop_fraction(&self) -> f64 {
        let dropped = (0..self.locations.len()).filter(|&a| !self.kept(a)).count();
        dropped as f64 / self.locations.len().max(1) as f64
    }
}

/// Top-k experts of every token and their capacity slots (tutel `extract_critical`).
///
/// `scores`: row-major `[S, E]` softmax scores. Ties between experts go to the lower index. BPR:
/// tokens are visited by descending max score (stable: ties in token order), otherwise in token
/// order; an assignment's location counts the earlier visited tokens whose same choice went to
/// the same expert, and the k-th choices start after all (k-1)-th choices of that expert.
pub fn route(
    scores: &[f64],
    num_experts: usize,
    top_k: usize,
    capacity_factor: f64,
    batch_prioritized: bool,
) -> Routing {
    let e = num_experts;
    let s = scores.len() / e;
    let mut experts = Vec::with_capacity(s * top_k);
    for t in 0..s {
        let row = &scores[t * e..(t + 1) * e];
        let start = experts.len();
        for _ in 0..top_k {
            // largest not yet chosen; strict `>` keeps the lower index on ties
            let mut best = usize::MAX;
            for (i, &v) in row.iter().enumerate() {
                if !experts[start..].contains(&i) && (best == usize::MAX || v > row[best]) {
                    best = i;
                }
            }
            experts.push(best);
        }
    }
    let mut visit: Vec<usize> = (0..s).collect();
    if batch_prioritized {
        // max score = the first choice's; sort_by is stable: ties keep token order
        let max: Vec<f64> = (0..s).map(|t| scores[t * e + experts[t * top_k]]).collect();
        visit.sort_by(|&a, &b| max[b].total_cmp(&max[a]));
    }
    let mut locations = vec![0; s * top_k];
    let mut base = vec![0usize; e];
    for k in 0..top_k {
        let mut count = base.clone();
        for &t in &visit {
            let x = experts[t * top_k + k];
            locations[t * top_k + k] = count[x];
            count[x] += 1;
        }
        base = count;
    }
    Routing {
        num_experts: e,
        top_k,
        experts,
        locations,
        capacity: capacity(s, e, top_k, capacity_factor),
    }
}

// ------------------------------------------------------------------------------------------------
// Auxiliary loss
// ------------------------------------------------------------------------------------------------

/// `var(v) / (mean(v)^2 + 1e-10)` with torch's unbiased variance, `v` 1-D of length n >= 2.
fn cv_squared(v: &Tensor) -> candle_core::Result<Tensor> {
    let n = v.dim(0)? as f64;
    let mean = v.mean_all()?;
    let var = (v.broadcast_sub(&mean)?.sqr()?.sum_all()? / (n - 1.0))?;
    var.broadcast_div(&(mean.sqr()? + 1e-10)?)
}

/// tutel `losses.load_importance_loss` (Shazeer et al. 2017): `probs [S, E]` = softmax of the clean
/// logits, `threshold [S, 1]` = the noisy logit of each token's k-th choice.
/// `Imp = sum_t probs`, `Load = sum_t NormalCDF_{0, gate_noise/E}(probs - threshold)` (the reference
/// subtracts a noisy logit from a clean probability), result `(cv²(Imp) + cv²(Load)) / 2` with
/// cv² = unbiased var / (mean² + 1e-10). E = 1 gives 0 (torch: NaN); gate_noise = 0 takes the
/// CDF's limit, a step (0.5 at 0) without gradient (torch asserts gate_noise > 0). With gate
/// noise, on the CPU in f32/f64, one fused node ([`crate::ops::load_importance`]).
pub fn load_importance_loss(
    probs: &Tensor,
    threshold: &Tensor,
    gate_noise: f64,
) -> candle_core::Result<Tensor> {
    let e = probs.dim(1)?;
    if e < 2 {
        return Tensor::zeros((), probs.dtype(), probs.device());
    }
    if gate_noise > 0.0 && crate::ops::is_fused(probs) && threshold.dtype() == probs.dtype() {
        return crate::ops::load_importance(probs, threshold, gate_noise / e as f64);
    }
    composed_load_importance(probs, threshold, gate_noise)
}

/// [`load_importance_loss`] from candle ops (any device, and without gate noise).
fn composed_load_importance(
    probs: &Tensor,
    threshold: &Tensor,
    gate_noise: f64,
) -> candle_core::Result<Tensor> {
    let e = probs.dim(1)?;
    let l_imp = cv_squared(&probs.sum(0)?)?;
    let diff = probs.broadcast_sub(threshold)?;
    let cdf = if gate_noise > 0.0 {
        let sigma = gate_noise / e as f64;
        ((diff / (sigma * std::f64::consts::SQRT_2))?.erf()? + 1.0)? * 0.5
    } else {
        let dt = diff.dtype();
        Ok(((diff.ge(0.0)?.to_dtype(dt)? + diff.gt(0.0)?.to_dtype(dt)?)? * 0.5)?.detach())
    }?;
    let l_load = cv_squared(&cdf.sum(0)?)?;
    (l_imp + l_load)? / 2.0
}

// ------------------------------------------------------------------------------------------------
// Stats collected per forward
// ------------------------------------------------------------------------------------------------

/// What one MoE layer recorded during a forward.
#[derive(Debug, Clone)]
pub struct MoeStats {
    /// Stage of the block.
    pub stage: usize,
    /// Block index within the stage.
    pub block: usize,
    /// Unweighted auxiliary loss (scalar, attached to the graph).
    pub aux_loss: Tensor,
    /// Fraction of assignments routed to each expert (before capacity).
    pub load: Vec<f64>,
    /// Fraction of assignments dropped by the capacity.
    pub drop_fraction: f64,
    /// Capacity per expert used.
    pub capacity: usize,
}

/// The MoE statistics one forward returns with its output: every MoE layer's, in block order
/// (empty for a dense model), and the weight of their summed auxiliary loss.
#[derive(Debug, Clone, Default)]
pub struct MoeAux {
    /// Per-layer stats, in block order.
    pub layers: Vec<MoeStats>,
    /// `model.moe.aux_loss_weight`.
    pub weight: f64,
}

impl MoeAux {
    /// The trainer's auxiliary losses: none for a dense model, else the one of [`summarize`]
    /// (`weight * sum over layers`, and its metrics).
    pub fn aux_losses(&self) -> Result<Vec<AuxLoss>> {
        Ok(summarize(&self.layers, self.weight)?.into_iter().collect())
    }
}

/// Weighted aux loss `weight * sum_l aux_l` (scalar, attached to the graph) and the metrics
/// `moe_aux` (that weighted sum), `moe_drop` (mean drop fraction over layers) and
/// `moe_load_l{i}_max` (largest expert load fraction of MoE layer i; 1/E = perfectly balanced).
/// `None` when `stats` is empty.
pub fn summarize(stats: &[MoeStats], weight: f64) -> Result<Option<AuxLoss>> {
    let Some(first) = stats.first() else {
        return Ok(None);
    };
    let mut total = first.aux_loss.clone();
    for s in &stats[1..] {
        total = (total + &s.aux_loss)?;
    }
    let total = (total * weight)?;
    let value = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let drop = stats.iter().map(|s| s.drop_fraction).sum::<f64>() / stats.len() as f64;
    let mut metrics = vec![
        ("moe_aux".to_string(), value),
        ("moe_drop".to_string(), drop),
    ];
    for (i, s) in stats.iter().enumerate() {
        let max = s.load.iter().cloned().fold(0.0, f64::max);
        metrics.push((format!("moe_load_l{i}_max"), max));
    }
    Ok(Some(AuxLoss {
        value: total,
        metrics,
    }))
}

// ------------------------------------------------------------------------------------------------
// MoeMlp
// ------------------------------------------------------------------------------------------------

/// `n` gate-noise draws `N(0, 1) * scale` in `T` (f32 or f64).
fn draw_noise<T>(rng: &SharedRng, n: usize, scale: f64) -> Vec<T>
where
    T: candle_core::WithDType,
    StandardNormal: rand_distr::Distribution<T>,
{
    let scale = T::from_f64(scale);
    rng.with(|g| {
        (0..n)
            .map(|_| g.sample::<T, _>(StandardNormal) * scale)
            .collect()
    })
}

/// An MoE feed-forward layer: gate + E experts fc1(C->hC) -> GELU(erf) -> dropout -> fc2(hC->C).
#[derive(Debug, Clone)]
pub struct MoeMlp {
    cfg: MoeConfig,
    /// Gate weight `[E, C]`.
    wg: Tensor,
    /// `[E, hC, C]`.
    fc1_w: Tensor,
    /// `[E, 1, hC]`.
    fc1_b: Tensor,
    /// `[E, hC, C]` (transposed: y = h @ w).
    fc2_w: Tensor,
    /// `[E, 1, C]`.
    fc2_b: Tensor,
    drop: f64,
}

impl MoeMlp {
    /// Builds under `vb` (a block's `mlp.`): keys `_moe_layer.gates.0.wg.weight` and
    /// `_moe_layer.experts.batched_*`; weights N(0, 0.005) (reference `INIT_STD`), biases 0.
    pub fn new(
        dim: usize,
        hidden: usize,
        cfg: &MoeConfig,
        drop: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let e = cfg.num_experts;
        let std = Init::Randn {
            mean: 0.0,
            stdev: 0.005,
        };
        let m = vb.pp("_moe_layer");
        let wg = m
            .pp("gates")
            .pp("0")
            .pp("wg")
            .get_with_hints((e, dim), "weight", std)?;
        let ex = m.pp("experts");
        Ok(Self {
            cfg: cfg.clone(),
            wg,
            fc1_w: ex.get_with_hints((e, hidden, dim), "batched_fc1_w", std)?,
            fc1_b: ex.get_with_hints((e, 1, hidden), "batched_fc1_bias", Init::Const(0.0))?,
            fc2_w: ex.get_with_hints((e, hidden, dim), "batched_fc2_w", std)?,
            fc2_b: ex.get_with_hints((e, 1, dim), "batched_fc2_bias", Init::Const(0.0))?,
            drop,
        })
    }

    /// [`load_importance_loss`] of `logits [S, E]`, their noisy version and the routing made
    /// from it (threshold = the noisy logit of each token's k-th choice).
    fn aux_loss(
        &self,
        logits: &Tensor,
        noisy: &Tensor,
        r: &Routing,
    ) -> candle_core::Result<Tensor> {
        let (s, e) = logits.dims2()?;
        let k = r.top_k;
        let thr_idx: Vec<u32> = (0..s)
            .map(|t| (t * e + r.experts[t * k + k - 1]) as u32)
            .collect();
        let thr = noisy
            .flatten_all()?
            .index_select(&Tensor::from_vec(thr_idx, s, logits.device())?, 0)?
            .reshape((s, 1))?;
        let probs = crate::ops::softmax_last(logits)?;
        load_importance_loss(&probs, &thr, self.cfg.gate_noise)
    }

    /// `x [..., C]` -> (`[..., C]`, routing, aux loss). Gate noise and dropout draw from `rng`
    /// when `train`; the capacity factor is the train or eval one. The aux loss is only computed
    /// in training (0 in eval, where nothing uses it).
    pub fn forward(
        &self,
        x: &Tensor,
        rng: &SharedRng,
        train: bool,
    ) -> candle_core::Result<(Tensor, Routing, Tensor)> {
        let shape = x.dims().to_vec();
        let c = shape[shape.len() - 1];
        let s = x.elem_count() / c;
        let (e, k) = (self.cfg.num_experts, self.cfg.top_k);
        let xf = x.reshape((s, c))?;
        // fp32 gate (reference): half inputs are routed in f32, f32/f64 as they are.
        let gdt = match x.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let (xg, wg) = (xf.to_dtype(gdt)?, self.wg.to_dtype(gdt)?);
        // (S, E): the fused linear on the CPU (one node, one backward op); elsewhere a plain f32
        // matmul (`ops::linear`'s fallback would follow `run.precision: bf16`)
        let logits = if crate::ops::is_fused(&xg) {
            crate::ops::linear(&xg, &wg, None)?
        } else {
            xg.matmul(&wg.t()?)?
        };
        let noisy = if train && self.cfg.gate_noise > 0.0 {
            // rand_distr's f32 StandardNormal is its f64 draw cast, so f32 samples are the same
            // stream as f64 ones (a run resumes the same either way), without an f64 buffer
            let scale = self.cfg.gate_noise / e as f64;
            let n = match gdt {
                DType::F64 => {
                    Tensor::from_vec(draw_noise::<f64>(rng, s * e, scale), (s, e), x.device())?
                }
                _ => Tensor::from_vec(draw_noise::<f32>(rng, s * e, scale), (s, e), x.device())?,
            };
            (&logits + n)?
        } else {
            logits.clone()
        };
        let scores = crate::ops::softmax_last(&noisy)?;
        let cf = if train {
            self.cfg.capacity_factor
        } else {
            self.cfg.eval_capacity_factor
        };
        let sv = scores
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let r = route(&sv, e, k, cf, self.cfg.batch_prioritized);

        let dev = x.device();
        let aux = if train {
            self.aux_loss(&logits, &noisy, &r)?
        } else {
            Tensor::zeros((), gdt, dev)? // only training uses it
        };

        // sorted layout: kept assignments expert by expert (slot order within an expert), so
        // expert e owns rows offsets[e]..offsets[e+1]; dropped assignments get no row
        let mut offsets = vec![0usize; e + 1];
        for a in 0..s * k {
            if r.kept(a) {
                offsets[r.experts[a] + 1] += 1;
            }
        }
        for i in 0..e {
            offsets[i + 1] += offsets[i];
        }
        let n = offsets[e];
        if n == 0 {
            return Ok((x.zeros_like()?, r, aux));
        }
        let mut tok = vec![0u32; n];
        let mut gidx = vec![0u32; n];
        let mut fill = offsets[..e].to_vec();
        for a in 0..s * k {
            if r.kept(a) {
                let ex = r.experts[a];
                let (t, row) = (a / k, fill[ex]);
                tok[row] = t as u32;
                gidx[row] = (t * e + ex) as u32;
                fill[ex] += 1;
            }
        }
        let rows = Arc::new(SortedRows::new(s, tok, offsets)?);
        let gidx = Tensor::from_vec(gidx, n, dev)?;
        let mut gates = scores.flatten_all()?.index_select(&gidx, 0)?;
        if self.cfg.normalize_gate && k > 1 {
            // denominator = sum of the token's top-k scores, clamped at eps (tutel)
            let top: Vec<u32> = (0..s * k)
                .map(|a| ((a / k) * e + r.experts[a]) as u32)
                .collect();
            let eps = if gdt == DType::F64 {
                f64::EPSILON
            } else {
                f32::EPSILON as f64
            };
            let denom = scores
                .flatten_all()?
                .index_select(&Tensor::from_vec(top, s * k, dev)?, 0)?
                .reshape((s, k))?
                .sum(1)?
                .maximum(eps)?;
            let tok = rows.tok_tensor(dev)?;
            gates = (gates / denom.index_select(&tok, 0)?)?;
        }
        let gates = gates.to_dtype(x.dtype())?; // (N)

        // gather -> fc1 -> GELU and fc2 -> gate -> scatter: one node each (ops::moe_experts)
        let h = experts_fc1_gelu(&xf, &self.fc1_w, &self.fc1_b, &rows)?;
        let h = crate::layers::dropout(&h, self.drop, rng, train)?; // (N, hC)
        let y = grouped_linear(
            &h,
            &self.fc2_w,
            &self.fc2_b,
            rows.offsets(),
            WeightLayout::InOut,
        )?;
        // a token's k outputs add up; dropped tokens stay 0 (the block's residual carries them)
        let out = experts_combine(&y, &gates, &rows)?;
        Ok((out.reshape(shape)?, r, aux))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use mimlab_engine::init::seeded_var_builder;

    fn cfg(e: usize, k: usize) -> MoeConfig {
        MoeConfig {
            num_experts: e,
            top_k: k,
            gate_noise: 0.0,
            ..MoeConfig::default()
        }
    }

    fn build(c: &MoeConfig, dim: usize, hid: usize, seed: u64) -> (VarMap, MoeMlp) {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F64, &Device::Cpu);
        let m = MoeMlp::new(dim, hid, c, 0.0, vb).unwrap();
        (vm, m)
    }

    /// Every variable of `vm` uniform in [-1, 1), in name order, seeded.
    fn randomize(vm: &VarMap, seed: u64) {
        let mut rng = mimlab_engine::rng::rng_for(seed, &[]);
        let mut vars: Vec<_> = vm.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, var) in vars {
            let v = uniform(&mut rng, var.elem_count());
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn uniform(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn set(vm: &VarMap, key: &str, v: Vec<f64>) {
        let data = vm.data().lock().unwrap();
        let var = &data[key];
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }

    const WG: &str = "_moe_layer.gates.0.wg.weight";

    #[test]
    fn routing_picks_top_k_of_a_hand_made_gate() {
        // C = 3, E = 3: wg = identity, so logits = x and the top-k is the order of x's entries.
        let c = MoeConfig {
            capacity_factor: 10.0,
            eval_capacity_factor: 10.0,
            ..cfg(3, 2)
        };
        let (vm, m) = build(&c, 3, 4, 0);
        set(&vm, WG, vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]);
        let x = Tensor::new(
            &[[0.1f64, 2.0, 1.0], [3.0, -1.0, 0.5], [0.0, 0.2, 0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let (_, r, _) = m.forward(&x, &SharedRng::new(0), false).unwrap();
        assert_eq!(r.experts, vec![1, 2, 0, 2, 2, 1]);
        assert_eq!(r.capacity, 2 * 10);
        assert_eq!(r.drop_fraction(), 0.0);
        assert_eq!(r.load(), vec![1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
    }

    #[test]
    fn capacity_drops_in_bpr_order() {
        // S = 6, E = 2, k = 1, cf = 0.75: capacity = int(0.75 * 3) = 2.
        // Scores (E = 2: p0, 1 - p0); expert 0 wanted by tokens 0, 1, 2, 3, expert 1 by 4, 5.
        let p0 = [0.6, 0.9, 0.7, 0.8, 0.25, 0.45];
        let scores: Vec<f64> = p0.iter().flat_map(|&p| [p, 1.0 - p]).collect();
        let r = route(&scores, 2, 1, 0.75, true);
        assert_eq!(r.capacity, 2);
        assert_eq!(r.experts, vec![0, 0, 0, 0, 1, 1]);
        // BPR visit order by max score: t1 (.9), t3 (.8), t4 (.75), t2 (.7), t0 (.6), t5 (.55)
        assert_eq!(r.locations, vec![3, 0, 2, 1, 0, 1]);
        let kept: Vec<bool> = (0..6).map(|a| r.kept(a)).collect();
        assert_eq!(kept, vec![false, true, false, true, true, true]);
        assert!((r.drop_fraction() - 2.0 / 6.0).abs() < 1e-15);
        // Without BPR: token order, so tokens 0 and 1 keep expert 0's slots.
        let r = route(&scores, 2, 1, 0.75, false);
        assert_eq!(r.locations, vec![0, 1, 2, 3, 0, 1]);
        // k = 2: second choices start after all first choices of the expert.
        // capacity = 2 * int(0.75 * 3) = 4; expert 1's first choices are t4, t5 (2 of them).
        let r = route(&scores, 2, 2, 0.75, true);
        assert_eq!(r.capacity, 4);
        // second choices in BPR order: t1->1 (2), t3->1 (3), t4->0 (4), t2->1 (4), t0->1 (5),
        // t5->0 (5): expert 1 starts after its 2 first choices, expert 0 after its 4.
        let second: Vec<usize> = (0..6).map(|t| r.locations[t * 2 + 1]).collect();
        assert_eq!(second, vec![5, 2, 4, 3, 4, 5]);
    }

    /// The fused aux loss (gate noise on) against the composed candle ops: value and both
    /// gradients, f64 and f32, E = 2 and 8, 37 and 1,100 tokens.
    #[test]
    fn fused_aux_loss_matches_the_composed_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // 1100 tokens: several blocks of the fused forward's parallel partial sums
        for (s, e, noise) in [(37, 2, 1.0), (37, 8, 1.0), (1100, 8, 0.3)] {
            for dt in [DType::F64, DType::F32] {
                let logits = Tensor::randn(0f64, 2.0, (s, e), &dev)?;
                let probs = Var::from_tensor(&candle_nn::ops::softmax(&logits, 1)?.to_dtype(dt)?)?;
                // thresholds near the probabilities, so the normal densities are not all ~0
                let thr = Var::from_tensor(
                    &(probs.max_keepdim(1)?
                        + Tensor::randn(0f64, 0.1, (s, 1), &dev)?.to_dtype(dt)?)?,
                )?;
                let fused = load_importance_loss(&probs, &thr, noise)?;
                let plain = composed_load_importance(&probs, &thr, noise)?;
                let tol = if dt == DType::F64 { 1e-10 } else { 2e-4 };
                let (f, p) = (
                    fused.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    plain.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                );
                assert!(
                    p > 0.0 && ((f - p) / p).abs() < tol,
                    "E={e} {dt:?}: {f} vs {p}"
                );
                let gf = fused.backward()?;
                let gp = plain.backward()?;
                for (name, v) in [("probs", &probs), ("threshold", &thr)] {
                    let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                    assert_eq!(a.dims(), v.dims());
                    let d = crate::ops::testing::rel_diff(a, b)?;
                    assert!(d < tol, "E={e} {dt:?} d{name}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn aux_loss_equals_hand_computed_value() {
        // S = 2, E = 2, k = 1, gate_noise 1 -> sigma = 0.5; noisy logits = clean logits here.
        let logits = [[0.0f64, 1.0], [2.0, 0.0]];
        let p: Vec<[f64; 2]> = logits
            .iter()
            .map(|l| {
                let z = l[0].exp() + l[1].exp();
                [l[0].exp() / z, l[1].exp() / z]
            })
            .collect();
        let thr = [1.0, 2.0]; // top-1 noisy logit
        let cv = |v: [f64; 2]| {
            let m = (v[0] + v[1]) / 2.0;
            let var = (v[0] - m).powi(2) + (v[1] - m).powi(2); // unbiased: / (2 - 1)
            var / (m * m + 1e-10)
        };
        let imp = [p[0][0] + p[1][0], p[0][1] + p[1][1]];
        // NormalCDF_{0, 0.5}(d) = (1 + erf(d / (0.5 sqrt 2))) / 2, erf from a series
        let erf = |x: f64| {
            let mut sum = 0.0;
            let mut term = x;
            for n in 0..60 {
                sum += term / (2 * n + 1) as f64;
                term *= -x * x / (n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let cdf = |d: f64| 0.5 * (1.0 + erf(d / (0.5 * 2f64.sqrt())));
        let load = [
            cdf(p[0][0] - thr[0]) + cdf(p[1][0] - thr[1]),
            cdf(p[0][1] - thr[0]) + cdf(p[1][1] - thr[1]),
        ];
        let want = (cv(imp) + cv(load)) / 2.0;
        let dev = Device::Cpu;
        let probs = Tensor::new(&[p[0], p[1]], &dev).unwrap();
        let t = Tensor::new(&[[thr[0]], [thr[1]]], &dev).unwrap();
        let got = load_importance_loss(&probs, &t, 1.0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // And through the layer: wg = identity on C = 2 and x = logits gives the same loss.
        let (vm, m) = build(&cfg(2, 1), 2, 3, 0);
        set(&vm, WG, vec![1., 0., 0., 1.]);
        let c = MoeConfig {
            gate_noise: 1.0,
            ..cfg(2, 1)
        };
        let m = MoeMlp { cfg: c, ..m };
        let x = Tensor::new(&logits, &dev).unwrap();
        let (_, r, aux) = m.forward(&x, &SharedRng::new(0), false).unwrap();
        assert_eq!(aux.to_scalar::<f64>().unwrap(), 0.0, "not computed in eval");
        let aux = m.aux_loss(&x, &x, &r).unwrap();
        assert!((aux.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn one_expert_top1_equals_dense_mlp_and_dropped_tokens_are_zero() {
        let dev = Device::Cpu;
        let (vm, m) = build(&cfg(1, 1), 4, 6, 5);
        randomize(&vm, 1);
        let mut rng = mimlab_engine::rng::rng_for(100 + 1, &[]);
        let x = Tensor::from_vec(uniform(&mut rng, 24), (2, 3, 4), &dev).unwrap();
        let (y, r, aux) = m.forward(&x, &SharedRng::new(0), true).unwrap();
        assert_eq!(r.drop_fraction(), 0.0);
        assert_eq!(aux.to_scalar::<f64>().unwrap(), 0.0);
        let w1 = m.fc1_w.squeeze(0).unwrap();
        let w2 = m.fc2_w.squeeze(0).unwrap(); // stored transposed
        let xf = x.reshape((6, 4)).unwrap();
        let dense = xf
            .matmul(&w1.t().unwrap())
            .unwrap()
            .broadcast_add(&m.fc1_b.squeeze(0).unwrap())
            .unwrap()
            .gelu_erf()
            .unwrap()
            .matmul(&w2)
            .unwrap()
            .broadcast_add(&m.fc2_b.squeeze(0).unwrap())
            .unwrap();
        let diff = (y.reshape((6, 4)).unwrap() - dense)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");

        // capacity factor 0.5 over 6 tokens: capacity int(0.5 * 6) = 3, three tokens dropped
        let c = MoeConfig {
            capacity_factor: 0.5,
            ..cfg(1, 1)
        };
        let m = MoeMlp { cfg: c, ..m };
        let (y, r, _) = m.forward(&x, &SharedRng::new(0), true).unwrap();
        assert_eq!(r.capacity, 3);
        let rows = y.reshape((6, 4)).unwrap().to_vec2::<f64>().unwrap();
        for (t, row) in rows.iter().enumerate() {
            let zero = row.iter().all(|&v| v == 0.0);
            assert_eq!(zero, !r.kept(t), "token {t}: {row:?}");
        }
        assert_eq!((0..6).filter(|&t| !r.kept(t)).count(), 3);
    }

    #[test]
    fn gradients_reach_gate_and_experts() {
        // E = 3, k = 2, normalized gates, no noise, f64 finite differences.
        let dev = Device::Cpu;
        let c = MoeConfig {
            normalize_gate: true,
            capacity_factor: 4.0,
            ..cfg(3, 2)
        };
        let (vm, m) = build(&c, 4, 5, 2);
        randomize(&vm, 4);
        let mut rng = mimlab_engine::rng::rng_for(100 + 4, &[]);
        let x = Tensor::from_vec(uniform(&mut rng, 20), (5, 4), &dev).unwrap();
        let wt = Tensor::from_vec(uniform(&mut rng, 20), (5, 4), &dev).unwrap();
        let srng = SharedRng::new(0);
        let loss = |m: &MoeMlp| -> Tensor {
            let (y, _, aux) = m.forward(&x, &srng, true).unwrap();
            ((y * &wt).unwrap().sum_all().unwrap() + aux).unwrap()
        };
        let grads = loss(&m).backward().unwrap();
        let data = vm.data().lock().unwrap().clone();
        let eps = 1e-6;
        for key in [
            WG,
            "_moe_layer.experts.batched_fc1_w",
            "_moe_layer.experts.batched_fc1_bias",
            "_moe_layer.experts.batched_fc2_w",
            "_moe_layer.experts.batched_fc2_bias",
        ] {
            let var: &Var = &data[key];
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {key}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!(g.iter().any(|v| v.abs() > 1e-6), "{key}: zero gradient");
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for idx in [0, base.len() / 2, base.len() - 1] {
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[idx] += d;
                    var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                        .unwrap();
                    loss(&m).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                at(0.0);
                let rel = (fd - g[idx]).abs() / fd.abs().max(g[idx].abs()).max(1e-3);
                assert!(
                    rel < 1e-5,
                    "{key}[{idx}]: analytic {} vs numeric {fd}",
                    g[idx]
                );
            }
        }
    }

    #[test]
    fn config_validation_names_the_key() {
        let depths = [2, 2, 6, 2];
        assert_eq!(
            MoeConfig::default_blocks(&depths),
            vec![vec![-1], vec![-1], vec![1, 3, 5], vec![1]]
        );
        let c = MoeConfig {
            num_experts: 4,
            ..MoeConfig::default()
        };
        assert_eq!(c.num_layers(&depths), 4);
        assert!(c.is_moe_block(&depths, 2, 3) && !c.is_moe_block(&depths, 2, 2));
        assert!(!MoeConfig::default().is_moe_block(&depths, 2, 3));
        let bad = MoeConfig {
            blocks: vec![vec![-1], vec![-1], vec![1, 6], vec![1]],
            ..c.clone()
        };
        let e = bad.validate(&depths).unwrap_err().to_string();
        assert!(
            e.contains("model.moe.blocks[2]") && e.contains("block 6"),
            "{e}"
        );
        let bad = MoeConfig {
            top_k: 3,
            ..c.clone()
        };
        assert!(bad
            .validate(&depths)
            .unwrap_err()
            .to_string()
            .contains("model.moe.top_k"));
        let bad = MoeConfig {
            blocks: vec![vec![1]],
            ..c.clone()
        };
        assert!(bad
            .validate(&depths)
            .unwrap_err()
            .to_string()
            .contains("model.moe.blocks"));
        let e = serde_json::from_str::<MoeConfig>(r#"{"experts": 4}"#).unwrap_err();
        assert!(e.to_string().contains("experts"));
    }
}

//! Per-step learning-rate schedules (architecture.md 3.5; steps are optimizer iterations).
use serde::{Deserialize, Serialize};

/// Shape of the schedule after the linear warmup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ScheduleKind {
    /// timm CosineLRScheduler (warmup_prefix=True, one cycle) down to `min_lr`.
    Cosine,
    /// Official SimMIM MultiStepLRScheduler: `base * gamma^(#milestones <= t)`.
    Multistep,
    /// mmseg's `PolyLR(power=1.0, eta_min=min_lr)` after the warmup (the UPerNet ADE20K
    /// schedule): `min_lr + (base - min_lr) * (1 - (t - Tw) / (T - Tw))`.
    Poly,
}

/// Per-step lr (architecture.md 3.5, timm CosineLRScheduler warmup_prefix=True):
/// `t < Tw`: `warmup_lr + t*(base-warmup_lr)/Tw`; cosine:
/// `min_lr + 0.5*(base-min_lr)*(1+cos(pi*(t-Tw)/(T-Tw)))`; multistep: `base * gamma^(#milestones <= t)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    /// Which decay follows the warmup.
    pub kind: ScheduleKind,
    /// Peak lr, reached at the end of the warmup.
    pub base_lr: f64,
    /// lr at step 0.
    pub warmup_lr: f64,
    /// Final lr of the cosine schedule (unused by multistep, as in the official code).
    pub min_lr: f64,
    /// Tw, in optimizer steps.
    pub warmup_steps: u64,
    /// T, in optimizer steps.
    pub total_steps: u64,
    /// Multistep milestones, in optimizer steps counted from 0 (warmup included).
    pub milestones: Vec<u64>,
    /// Multistep decay factor.
    pub gamma: f64,
}

impl LrSchedule {
    /// lr of the optimizer step with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.lr_scaled(step, 1.0)
    }

    /// lr of a parameter group whose peak is `base_lr * scale` (layer-wise decay). As timm's
    /// schedulers, which read each group's initial lr (architecture.md 7.1): the warmup still
    /// starts at the UNSCALED `warmup_lr` and the cosine ends at the UNSCALED `min_lr`.
    pub fn lr_scaled(&self, step: u64, scale: f64) -> f64 {
        let base_lr = self.base_lr * scale;
        if step < self.warmup_steps {
            let per_step = (base_lr - self.warmup_lr) / self.warmup_steps as f64;
            return self.warmup_lr + step as f64 * per_step;
        }
        match self.kind {
            ScheduleKind::Cosine => {
                let t = (step - self.warmup_steps) as f64;
                let t_i = self.total_steps.saturating_sub(self.warmup_steps) as f64;
                if t >= t_i {
                    // timm, cycle_limit=1: past the cycle the lr stays at min_lr.
                    return self.min_lr;
                }
                let cos = (std::f64::consts::PI * t / t_i).cos();
                self.min_lr + 0.5 * (base_lr - self.min_lr) * (1.0 + cos)
            }
            ScheduleKind::Poly => {
                let t = (step - self.warmup_steps) as f64;
                let t_i = self.total_steps.saturating_sub(self.warmup_steps) as f64;
                let left = if t_i > 0.0 {
                    (1.0 - t / t_i).max(0.0)
                } else {
                    0.0
                };
                self.min_lr + (base_lr - self.min_lr) * left
            }
            ScheduleKind::Multistep => {
                // bisect.bisect_right(milestones, t)
                let passed = self.milestones.iter().filter(|&&m| m <= step).count();
                base_lr * self.gamma.powi(passed as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1e-3,
            warmup_lr: 1e-6,
            min_lr: 1e-5,
            warmup_steps: 10,
            total_steps: 110,
            milestones: vec![60, 90],
            gamma: 0.1,
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-15, "{a} vs {b}");
    }

    #[test]
    fn warmup_then_cosine() {
        let s = sched(ScheduleKind::Cosine);
        close(s.lr(0), 1e-6);
        close(s.lr(5), 1e-6 + 5.0 * (1e-3 - 1e-6) / 10.0); // 5.005e-4
        close(s.lr(5), 5.005e-4);
        close(s.lr(10), 1e-3); // end of warmup: cos(0) = 1
        close(s.lr(60), 1e-5 + 0.5 * (1e-3 - 1e-5)); // middle: cos(pi/2) = 0 -> 5.05e-4
                                                     // last step t = 109: cos(pi * 99/100)
        close(
            s.lr(109),
            1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI * 0.99).cos()),
        );
        assert!(s.lr(109) > 1e-5 && s.lr(109) < 1.03e-5);
        close(s.lr(110), 1e-5);
        close(s.lr(500), 1e-5);
    }

    #[test]
    fn warmup_then_poly() {
        let s = sched(ScheduleKind::Poly);
        close(s.lr(0), 1e-6);
        close(s.lr(10), 1e-3);
        // halfway through the 100 decay steps: min + (base - min) / 2
        close(s.lr(60), 1e-5 + 0.5 * (1e-3 - 1e-5));
        close(s.lr(109), 1e-5 + (1e-3 - 1e-5) / 100.0);
        close(s.lr(110), 1e-5);
        close(s.lr(500), 1e-5);
        // layer decay scales the peak, not the floor
        close(s.lr_scaled(60, 0.5), 1e-5 + 0.5 * (0.5e-3 - 1e-5));
    }

    #[test]
    fn warmup_then_multistep() {
        let s = sched(ScheduleKind::Multistep);
        close(s.lr(0), 1e-6);
        close(s.lr(9), 1e-6 + 9.0 * (1e-3 - 1e-6) / 10.0);
        close(s.lr(10), 1e-3);
        close(s.lr(59), 1e-3);
        close(s.lr(60), 1e-4);
        close(s.lr(89), 1e-4);
        close(s.lr(90), 1e-3 * 0.1 * 0.1);
        close(s.lr(109), 1e-3 * 0.01);
    }

    #[test]
    fn scaled_groups_keep_warmup_start_and_min_lr_unscaled() {
        let s = sched(ScheduleKind::Cosine);
        close(s.lr_scaled(0, 0.5), 1e-6); // warmup starts at the unscaled warmup_lr
        close(s.lr_scaled(5, 0.5), 1e-6 + 5.0 * (5e-4 - 1e-6) / 10.0);
        close(s.lr_scaled(10, 0.5), 5e-4); // peak is base * scale
        close(s.lr_scaled(60, 0.5), 1e-5 + 0.5 * (5e-4 - 1e-5));
        close(s.lr_scaled(110, 0.5), 1e-5); // ends at the unscaled min_lr
        close(s.lr_scaled(37, 1.0), s.lr(37));
        let m = sched(ScheduleKind::Multistep);
        close(m.lr_scaled(60, 0.5), 5e-5);
    }

    #[test]
    fn no_warmup_and_yaml_names() {
        let mut s = sched(ScheduleKind::Cosine);
        s.warmup_steps = 0;
        close(s.lr(0), 1e-3);
        let k: ScheduleKind = serde_yaml_ng::from_str("multistep").unwrap();
        assert_eq!(k, ScheduleKind::Multistep);
        assert!(serde_yaml_ng::from_str::<ScheduleKind>("linear").is_err());
    }
}

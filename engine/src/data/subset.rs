//! Which samples of a split are served: the class-balanced `label_fraction` subset of a labelled
//! train split, then the `max_samples` cap.
use anyhow::{bail, Result};
use rand::seq::SliceRandom;

use super::{DataConfig, Split};
use crate::rng::rng_for;

/// Seed of the `label_fraction` subset when `data.label_seed` is not set: fixed, so every run with
/// the same fraction finetunes on the same images.
pub const LABEL_SUBSET_SEED: u64 = 0x1abe1;

/// Per class, keeps `max(1, round(count * fraction))` images chosen by a shuffle seeded from
/// (`seed`, class); returns the kept indices in ascending order.
pub fn balanced_subset(labels: &[u32], fraction: f64, seed: u64) -> Vec<usize> {
    if fraction >= 1.0 {
        return (0..labels.len()).collect();
    }
    let classes = labels.iter().map(|l| *l as usize + 1).max().unwrap_or(0);
    let mut by_class = vec![Vec::new(); classes];
    for (i, l) in labels.iter().enumerate() {
        by_class[*l as usize].push(i);
    }
    let mut kept = Vec::new();
    for (class, mut members) in by_class.into_iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let k = ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len());
        members.shuffle(&mut rng_for(seed, &[class as u64]));
        kept.extend_from_slice(&members[..k]);
    }
    kept.sort_unstable();
    kept
}

/// The indices of `split` to serve, out of `n` samples (`labels` when the dataset has them).
pub fn select(
    cfg: &DataConfig,
    split: Split,
    n: usize,
    labels: Option<&[u32]>,
) -> Result<Vec<usize>> {
    let mut keep: Vec<usize> = match (split, labels) {
        (Split::Train, Some(l)) if cfg.label_fraction < 1.0 => {
            balanced_subset(l, cfg.label_fraction, cfg.label_subset_seed())
        }
        (Split::Train, None) if cfg.label_fraction < 1.0 => {
            bail!(
                "data.label_fraction = {} needs a labelled dataset; `{}` has no labels",
                cfg.label_fraction,
                cfg.dataset
            )
        }
        _ => (0..n).collect(),
    };
    if let Some(m) = cfg.max_samples {
        keep.truncate(m);
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_subset_counts_and_seed() {
        // 3 classes of 100, 50, 7 samples, interleaved.
        let labels: Vec<u32> = (0..100)
            .map(|_| 0)
            .chain((0..50).map(|_| 1))
            .chain((0..7).map(|_| 2))
            .collect();
        let kept = balanced_subset(&labels, 0.1, LABEL_SUBSET_SEED);
        let count = |c| kept.iter().filter(|i| labels[**i] == c).count();
        assert_eq!((count(0), count(1), count(2)), (10, 5, 1));
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            kept,
            balanced_subset(&labels, 0.1, LABEL_SUBSET_SEED),
            "seeded"
        );
        let other = balanced_subset(&labels, 0.1, 7);
        assert_ne!(kept, other, "another label_seed, other images");
        assert_eq!(
            other.iter().filter(|i| labels[**i] == 1).count(),
            5,
            "still balanced"
        );
        assert_ne!(
            kept[..10],
            (0..10).collect::<Vec<_>>()[..],
            "shuffled, not the first ones"
        );
        assert_eq!(balanced_subset(&labels, 1.0, 7).len(), 157);
    }
}

//! Weighted k-NN classification on frozen features (DINO's `knn_classifier`): cosine similarity
//! of L2-normalized features, the k most similar training samples vote for their class with
//! weight `exp(sim / T)`.
use rayon::prelude::*;

use crate::classify::metrics::{ClassificationReport, Confusion};
use crate::probe::features::FeatureSet;

fn normalized(set: &FeatureSet) -> Vec<f32> {
    let mut out = set.features.clone();
    for row in out.chunks_mut(set.dim.max(1)) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
    out
}

/// Per test row, the class scores (sum of `exp(sim/T)` over the k nearest training rows of each
/// class), `[test.len() x classes]` row-major.
pub fn knn_scores(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    k: usize,
    temperature: f64,
) -> Vec<f32> {
    assert_eq!(
        train.dim, test.dim,
        "k-NN: train and test features differ in width"
    );
    let (tr, te, d) = (normalized(train), normalized(test), train.dim);
    let k = k.min(train.len());
    let mut scores = vec![0f32; test.len() * classes];
    scores
        .par_chunks_mut(classes)
        .enumerate()
        .for_each(|(i, out)| {
            let q = &te[i * d..(i + 1) * d];
            let mut sims: Vec<(f32, usize)> = tr
                .chunks(d)
                .enumerate()
                .map(|(j, r)| (q.iter().zip(r).map(|(a, b)| a * b).sum::<f32>(), j))
                .collect();
            if k < sims.len() {
                // the k largest similarities (ties: lower index first), in any order
                sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                sims.truncate(k);
            }
            for (s, j) in sims {
                out[train.labels[j] as usize] += ((s as f64) / temperature).exp() as f32;
            }
        });
    scores
}

/// k-NN top-1/top-5 of `test` against `train`.
pub fn knn_evaluate(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    k: usize,
    temperature: f64,
) -> ClassificationReport {
    let scores = knn_scores(train, test, classes, k, temperature);
    let mut m = Confusion::new(classes);
    for (row, &y) in scores.chunks(classes).zip(&test.labels) {
        m.add_one(row, y as usize);
    }
    m.report()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rows: &[[f32; 2]], labels: &[u32]) -> FeatureSet {
        FeatureSet {
            features: rows.iter().flatten().copied().collect(),
            dim: 2,
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn weighted_votes_on_a_hand_made_set() {
        // Training points on the unit circle at 0, 10, 80, 90 degrees (norms differ: cosine).
        let deg = |a: f32| [a.to_radians().cos(), a.to_radians().sin()];
        let mut p = [deg(0.), deg(10.), deg(80.), deg(90.)];
        p[1] = [p[1][0] * 5.0, p[1][1] * 5.0];
        let train = set(&p, &[0, 0, 1, 1]);
        // Query at 30 degrees, k = 3: neighbours 10 (class 0), 0 (class 0), 80 (class 1).
        let test = set(&[deg(30.)], &[0]);
        let s = knn_scores(&train, &test, 2, 3, 0.1);
        let w = |a: f64| (a.to_radians().cos() / 0.1).exp();
        assert!((s[0] as f64 - (w(20.) + w(30.))).abs() / (w(20.) + w(30.)) < 1e-5);
        assert!((s[1] as f64 - w(50.)).abs() / w(50.) < 1e-5);
        // Query at 60 degrees with k = 4 and a high temperature: 2 votes each, but class 1 is
        // closer (20, 30 degrees) than class 0 (50, 60): class 1 wins.
        let test = set(&[deg(60.)], &[1]);
        let r = knn_evaluate(&train, &test, 2, 4, 1.0);
        assert_eq!(r.top1, 100.0);
        // k larger than the training set: every point votes.
        let s = knn_scores(&train, &test, 2, 50, 1.0);
        let w1 = |a: f64| a.to_radians().cos().exp();
        assert!((s[0] as f64 - (w1(60.) + w1(50.))).abs() < 1e-5);
    }
}

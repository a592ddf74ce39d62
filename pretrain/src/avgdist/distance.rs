//! Exact Euclidean distance transform of a binary grid (Felzenszwalb & Huttenlocher 2012,
//! "Distance Transforms of Sampled Functions": 1-D lower envelope of parabolas, rows then columns).

/// Squared distance transform in 1-D: `d[q] = min_p (q - p)^2 + f[p]` over the finite `f[p]`
/// (all `+inf` when no `f[p]` is finite). Writes into `d`; `v`, `z` are scratch of len n, n + 1.
fn dt_1d(f: &[f64], d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let Some(first) = f.iter().position(|x| x.is_finite()) else {
        d.fill(f64::INFINITY);
        return;
    };
    // Lower envelope of the parabolas rooted at the finite sites.
    let mut k = 0usize;
    v[0] = first;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in first + 1..n {
        if !f[q].is_finite() {
            continue;
        }
        let fq = f[q] + (q * q) as f64;
        let mut s;
        loop {
            let p = v[k];
            s = (fq - (f[p] + (p * p) as f64)) / (2.0 * q as f64 - 2.0 * p as f64);
            // z[0] = -inf, so this never steps below k = 0.
            if s <= z[k] {
                k -= 1;
            } else {
                break;
            }
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    let mut k = 0usize;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let dx = q as f64 - p as f64;
        *dq = dx * dx + f[p];
    }
}

/// Squared Euclidean distance from every cell of a row-major `height x width` grid to the nearest
/// `true` cell (distance 1 between 4-neighbours); `+inf` everywhere when no cell is `true`.
/// Panics if `visible.len() != height * width` (a caller bug, not a data error).
pub fn squared_distance_transform(visible: &[bool], height: usize, width: usize) -> Vec<f64> {
    assert_eq!(visible.len(), height * width, "grid is height x width");
    let n = height.max(width);
    let (mut v, mut z) = (vec![0usize; n], vec![0f64; n + 1]);
    let mut g: Vec<f64> = visible
        .iter()
        .map(|&b| if b { 0.0 } else { f64::INFINITY })
        .collect();
    // Rows.
    let mut d = vec![0f64; n];
    for row in g.chunks_mut(width) {
        dt_1d(row, &mut d[..width], &mut v, &mut z);
        row.copy_from_slice(&d[..width]);
    }
    // Columns.
    let mut col = vec![0f64; height];
    for x in 0..width {
        for (y, c) in col.iter_mut().enumerate() {
            *c = g[y * width + x];
        }
        dt_1d(&col, &mut d[..height], &mut v, &mut z);
        for (y, &dy) in d[..height].iter().enumerate() {
            g[y * width + x] = dy;
        }
    }
    g
}

/// Euclidean distance from every cell to the nearest `true` (visible) cell centre; `+inf` for
/// every cell when no cell is visible.
pub fn distance_transform(visible: &[bool], height: usize, width: usize) -> Vec<f64> {
    let mut g = squared_distance_transform(visible, height, width);
    g.iter_mut().for_each(|x| *x = x.sqrt());
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimlab_engine::rng::rng_for;
    use rand::Rng;

    fn brute(visible: &[bool], h: usize, w: usize) -> Vec<f64> {
        (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f64, (i % w) as f64);
                (0..h * w)
                    .filter(|&j| visible[j])
                    .map(|j| {
                        let (vy, vx) = ((j / w) as f64, (j % w) as f64);
                        ((y - vy).powi(2) + (x - vx).powi(2)).sqrt()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    #[test]
    fn matches_brute_force_on_random_grids() {
        let mut rng = rng_for(42, &[]);
        for case in 0..50 {
            let h = rng.random_range(1..=20);
            let w = rng.random_range(1..=20);
            let p: f64 = rng.random_range(0.02..0.9);
            let vis: Vec<bool> = (0..h * w).map(|_| rng.random::<f64>() < p).collect();
            let got = distance_transform(&vis, h, w);
            let want = brute(&vis, h, w);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                if b.is_infinite() {
                    assert!(a.is_infinite(), "case {case} cell {i}");
                } else {
                    assert!(
                        (a - b).abs() < 1e-9,
                        "case {case} {h}x{w} cell {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_dimensional_and_empty() {
        // Visible at 0 and 6 in a row of 9: distances 0 1 2 3 2 1 0 1 2.
        let mut vis = vec![false; 9];
        vis[0] = true;
        vis[6] = true;
        assert_eq!(
            distance_transform(&vis, 1, 9),
            vec![0., 1., 2., 3., 2., 1., 0., 1., 2.]
        );
        assert_eq!(
            distance_transform(&vis, 9, 1),
            vec![0., 1., 2., 3., 2., 1., 0., 1., 2.]
        );
        assert!(distance_transform(&[false; 6], 2, 3)
            .iter()
            .all(|d| d.is_infinite()));
        // Diagonal: visible corner of a 3x3 -> far corner at sqrt(8).
        let mut vis = vec![false; 9];
        vis[0] = true;
        assert_eq!(distance_transform(&vis, 3, 3)[8], 8f64.sqrt());
    }
}

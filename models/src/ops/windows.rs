//! Swin's (shifted) window partition and its inverse, each one copy.
//!
//! Composed, a block's windows are `roll` (candle: `narrow` + `cat` per dim) -> reshape ->
//! permute -> contiguous copy -> reshape, and back the same way: five nodes each way, and
//! candle's backward starts every node's input gradient at zero and adds into it. Here each
//! direction is one gather of `C`-element rows, and its backward is the other direction.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::is_fused;

/// `[B, H, W, C]` -> `[B*nW, ws, ws, C]`, window index = b*nW + row*(W/ws) + col (the composed
/// reference; [`partition_windows`] is the one node with the shift folded in).
pub fn window_partition(x: &Tensor, ws: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / ws, ws, w / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b * (h / ws) * (w / ws), ws, ws, c))
}

/// Inverse of [`window_partition`]: `[B*nW, ws, ws, C]` -> `[B, H, W, C]`.
pub fn window_reverse(w: &Tensor, ws: usize, h: usize, w_: usize) -> Result<Tensor> {
    let (bn, _, _, c) = w.dims4()?;
    let b = bn / ((h / ws) * (w_ / ws));
    w.reshape((b, h / ws, w_ / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, h, w_, c))
}

/// The windows of `x [B, H, W, C]` cyclically shifted by `-shift` (`torch.roll(x, (-s, -s),
/// (1, 2))`, then [`window_partition`]), as `[B*nW, ws*ws, C]` token rows. Differentiable.
pub fn partition_windows(x: &Tensor, ws: usize, shift: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let g = Grid::new(b, h, w, c, ws, shift)?;
    if !is_fused(x) {
        let s = shift as i32;
        let x = if shift > 0 {
            x.roll(-s, 1)?.roll(-s, 2)?
        } else {
            x.clone()
        };
        return window_partition(&x, ws)?.reshape((g.windows(), ws * ws, c));
    }
    x.contiguous()?.apply_op1(Windows { g, merge: false })
}

/// Inverse of [`partition_windows`]: `[B*nW, ws*ws, C]` token rows -> `[B, H, W, C]`, shifted
/// back by `+shift`. Differentiable.
pub fn merge_windows(
    win: &Tensor,
    ws: usize,
    shift: usize,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let (bn, n, c) = win.dims3()?;
    let per_image = (h / ws.max(1)) * (w / ws.max(1));
    if n != ws * ws || per_image == 0 || bn % per_image != 0 {
        candle_core::bail!(
            "merge-windows: {:?} is not [B*nW, {ws}*{ws}, C] windows of a {h}x{w} map",
            win.dims()
        )
    }
    let g = Grid::new(bn / per_image, h, w, c, ws, shift)?;
    if !is_fused(win) {
        let s = shift as i32;
        let x = window_reverse(&win.reshape((bn, ws, ws, c))?, ws, h, w)?;
        return if shift > 0 {
            x.roll(s, 1)?.roll(s, 2)
        } else {
            Ok(x)
        };
    }
    win.contiguous()?.apply_op1(Windows { g, merge: true })
}

/// A `[B, H, W, C]` map cut into `ws x ws` windows after a cyclic shift by `-shift`.
#[derive(Clone, Copy)]
struct Grid {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
    shift: usize,
}

impl Grid {
    fn new(b: usize, h: usize, w: usize, c: usize, ws: usize, shift: usize) -> Result<Self> {
        if ws == 0 || !h.is_multiple_of(ws) || !w.is_multiple_of(ws) || shift >= ws.max(1) {
            candle_core::bail!(
                "windows: a {h}x{w} map does not split into {ws}x{ws} windows shifted by {shift}"
            )
        }
        Ok(Self {
            b,
            h,
            w,
            c,
            ws,
            shift,
        })
    }

    fn windows(&self) -> usize {
        self.b * (self.h / self.ws) * (self.w / self.ws)
    }

    /// The map pixel `(b, i, j)` (flat, in rows of C) that window row `r` (flat) reads.
    fn pixel(&self, r: usize) -> usize {
        let (ws, n) = (self.ws, self.ws * self.ws);
        let (per_row, per_image) = (self.w / ws, (self.h / ws) * (self.w / ws));
        let (win, t) = (r / n, r % n);
        let (b, wi) = (win / per_image, win % per_image);
        let i = ((wi / per_row) * ws + t / ws + self.shift) % self.h;
        let j = ((wi % per_row) * ws + t % ws + self.shift) % self.w;
        (b * self.h + i) * self.w + j
    }

    /// The window row (flat) that map pixel `p` (flat) lands in: the inverse of [`Self::pixel`].
    fn window_row(&self, p: usize) -> usize {
        let (ws, n) = (self.ws, self.ws * self.ws);
        let (per_row, per_image) = (self.w / ws, (self.h / ws) * (self.w / ws));
        let (b, i, j) = (p / (self.h * self.w), p / self.w % self.h, p % self.w);
        let (i, j) = (
            (i + self.h - self.shift) % self.h,
            (j + self.w - self.shift) % self.w,
        );
        let win = b * per_image + (i / ws) * per_row + j / ws;
        win * n + (i % ws) * ws + j % ws
    }
}

/// `merge: false`: map -> window rows; `true`: window rows -> map. Both are permutations of
/// `C`-element rows.
struct Windows {
    g: Grid,
    merge: bool,
}

impl Windows {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let c = self.g.c;
        let mut out = vec![T::zero(); x.len()];
        // rows per task: whole rows, about 16K elements
        let rows = (16 * 1024 / c.max(1)).max(1);
        out.par_chunks_mut(rows * c)
            .enumerate()
            .for_each(|(t, dst)| {
                for (k, row) in dst.chunks_exact_mut(c).enumerate() {
                    let r = t * rows + k;
                    let src = if self.merge {
                        self.g.window_row(r)
                    } else {
                        self.g.pixel(r)
                    };
                    row.copy_from_slice(&x[src * c..][..c]);
                }
            });
        out
    }
}

impl CustomOp1 for Windows {
    fn name(&self) -> &'static str {
        "windows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("windows: non-contiguous input")
        };
        let g = self.g;
        let shape = if self.merge {
            Shape::from((g.b, g.h, g.w, g.c))
        } else {
            Shape::from((g.windows(), g.ws * g.ws, g.c))
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..z])),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[a..z])),
            _ => candle_core::bail!("windows: f32 or f64 expected"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Windows {
            g: self.g,
            merge: !self.merge,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Equal, bit for bit, to the composed roll + partition (and reverse + roll back), forward
    /// and backward, with and without a shift, on a non-square map of several images.
    #[test]
    fn match_composed_roll_and_partition() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w, c, ws) = (2, 8, 12, 3, 4);
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?)?;
            let n = b * (h / ws) * (w / ws);
            let probe = Tensor::randn(0f64, 1.0, (n, ws * ws, c), &dev)?.to_dtype(dt)?;
            for shift in [0, 1, 3] {
                let s = shift as i32;
                let rolled = x.roll(-s, 1)?.roll(-s, 2)?;
                let plain = window_partition(&rolled, ws)?.reshape((n, ws * ws, c))?;
                let fused = partition_windows(&x, ws, shift)?;
                let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
                    let d = (a - b)?.abs()?.sum_all()?.to_dtype(DType::F64)?;
                    Ok(d.to_scalar::<f64>()? == 0.0)
                };
                assert!(same(&fused, &plain)?, "{dt:?} partition, shift {shift}");
                let back = merge_windows(&fused, ws, shift, (h, w))?;
                assert!(same(&back, &x)?, "{dt:?} round trip, shift {shift}");
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                let gp = (&plain * &probe)?.sum_all()?.backward()?;
                assert!(
                    same(gf.get(&x).unwrap(), gp.get(&x).unwrap())?,
                    "{dt:?} d partition"
                );
                // merge's gradient is the partition of the incoming gradient
                let m = Var::from_tensor(&plain)?;
                let probe_map = Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?;
                let gm = (merge_windows(&m, ws, shift, (h, w))? * &probe_map)?
                    .sum_all()?
                    .backward()?;
                let want = partition_windows(&probe_map, ws, shift)?;
                assert!(same(gm.get(&m).unwrap(), &want)?, "{dt:?} d merge");
            }
        }
        Ok(())
    }

    #[test]
    fn bad_grids_are_named() -> Result<()> {
        let x = Tensor::zeros((1, 6, 8, 2), DType::F32, &Device::Cpu)?;
        let e = partition_windows(&x, 4, 0).unwrap_err().to_string();
        assert!(
            e.contains("a 6x8 map does not split into 4x4 windows"),
            "{e}"
        );
        let w = Tensor::zeros((3, 16, 2), DType::F32, &Device::Cpu)?;
        let e = merge_windows(&w, 4, 0, (8, 8)).unwrap_err().to_string();
        assert!(e.contains("merge-windows: [3, 16, 2] is not"), "{e}");
        Ok(())
    }
}

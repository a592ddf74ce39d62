//! The data movement of a CPU convolution as graph nodes: [`im2col`] (NCHW map -> channels-last
//! patch rows, backward col2im) and the layout changes [`channels_last`] / [`channels_first`].
//!
//! With them a conv is `im2col -> ops::linear -> channels_first` (`layers::Conv2d`). candle
//! 0.11.1's own CPU conv2d copies its im2col tiles element by element and runs its backward as a
//! direct transposed conv (38% + 15% of a digits-det FCOS step), and its permute + `contiguous`
//! walks a strided index per element (40% once the conv was a gemm); these kernels copy rows.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

use super::{dispatch, is_fused, par_items, slice, storage};

/// The patches of a convolution with a `k` x `k` kernel, stride `s` and zero padding `p`:
/// `x [B, C, H, W]` -> `[B, H', W', k k C]` with `H' = (H + 2p - k) / s + 1`, each row ordered
/// tap-major (`(kh, kw, c)`, the weight `[o, i, kh, kw]` permuted to `[o, kh, kw, i]`).
/// Differentiable (col2im sums each patch entry back onto its pixel). f32 / f64 on the CPU.
pub fn im2col(x: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if k == 0 || s == 0 || h + 2 * p < k || w + 2 * p < k {
        candle_core::bail!("im2col: {h}x{w} map, kernel {k}, stride {s}, padding {p}")
    }
    if !is_fused(x) {
        candle_core::bail!("im2col: CPU f32/f64 only, got {:?}", x.dtype())
    }
    let geo = Geometry {
        b,
        c,
        h,
        w,
        k,
        s,
        p,
        ho: (h + 2 * p - k) / s + 1,
        wo: (w + 2 * p - k) / s + 1,
    };
    x.contiguous()?.apply_op1(Im2Col(geo))
}

/// `[B, C, H, W]` -> `[B, H, W, C]`, contiguous; differentiable. Off the fused path: candle's
/// permute.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !is_fused(x) {
        return x.permute((0, 2, 3, 1))?.contiguous();
    }
    transpose(x, b, c, h * w)?.reshape((b, h, w, c))
}

/// `[B, H, W, C]` -> `[B, C, H, W]`, contiguous; differentiable. Off the fused path: candle's
/// permute.
pub fn channels_first(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if !is_fused(x) {
        return x.permute((0, 3, 1, 2))?.contiguous();
    }
    transpose(x, b, h * w, c)?.reshape((b, c, h, w))
}

fn transpose(x: &Tensor, b: usize, m: usize, n: usize) -> Result<Tensor> {
    if x.elem_count() == 0 {
        return x.reshape((b, n, m));
    }
    x.contiguous()?.apply_op1(Transpose { b, m, n })
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// Scalars in one output row (one output pixel's patch).
    fn row(&self) -> usize {
        self.k * self.k * self.c
    }

    /// The input coordinate of output coordinate `o` and tap `t` along a side of length `n`.
    #[inline(always)]
    fn source(&self, o: usize, t: usize, n: usize) -> Option<usize> {
        (o * self.s + t).checked_sub(self.p).filter(|&i| i < n)
    }

    /// The taps of output pixel `(oy, ox)` that read the image (not the zero padding), in tap
    /// order: `(tap index kh * k + kw, input pixel index iy * W + ix)`.
    fn taps(&self, oy: usize, ox: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.k).flat_map(move |kh| {
            let iy = self.source(oy, kh, self.h);
            (0..self.k).filter_map(move |kw| {
                let ix = self.source(ox, kw, self.w)?;
                Some((kh * self.k + kw, iy? * self.w + ix))
            })
        })
    }
}

struct Im2Col(Geometry);

fn im2col_fwd<T: WithDType>(
    g: &Geometry,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "im2col")?;
    let (hw, row) = (g.h * g.w, g.row());
    // the images channels-last first, so that each tap is one contiguous copy of C values
    // instead of a gather with stride H W per channel (its mirror in col2im, a scatter, was 24%
    // of the digits-seg UPerNet training step: perf, 1 thread)
    let mut xl = vec![T::zero(); x.len()];
    par_items(&mut xl, g.c * hw, |first, imgs| {
        for (i, dst) in imgs.chunks_mut(g.c * hw).enumerate() {
            transpose_into(&x[(first + i) * g.c * hw..][..g.c * hw], dst, g.c, hw);
        }
    });
    let mut out = vec![T::zero(); g.b * g.ho * g.wo * row];
    // one item = the patches of one output row (`W'` pixels)
    par_items(&mut out, g.wo * row, |first, rows| {
        for (i, orow) in rows.chunks_mut(g.wo * row).enumerate() {
            let (b, oy) = ((first + i) / g.ho, (first + i) % g.ho);
            let img = &xl[b * g.c * hw..(b + 1) * g.c * hw];
            for (ox, patch) in orow.chunks_mut(row).enumerate() {
                for (t, at) in g.taps(oy, ox) {
                    patch[t * g.c..][..g.c].copy_from_slice(&img[at * g.c..][..g.c]);
                }
            }
        }
    });
    Ok(storage(out, (g.b, g.ho, g.wo, g.row())))
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, im2col_fwd(&self.0, s, l))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

/// The backward of [`Im2Col`]: each patch entry's gradient summed onto its input pixel (in a
/// fixed order: output pixels in raster order, then taps).
struct Col2Im(Geometry);

fn col2im<T: WithDType>(g: &Geometry, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let grad = slice::<T>(s, l, "col2im")?;
    let (hw, row) = (g.h * g.w, g.row());
    let per_image = g.ho * g.wo * row;
    let mut out = vec![T::zero(); g.b * g.c * hw];
    // one item = one image's input gradient: the images' sums never meet. Summed channels-last
    // (each tap one contiguous add of C values), then transposed to NCHW.
    par_items(&mut out, g.c * hw, |first, imgs| {
        let mut acc = vec![T::zero(); g.c * hw];
        for (i, dx) in imgs.chunks_mut(g.c * hw).enumerate() {
            let gb = &grad[(first + i) * per_image..][..per_image];
            acc.fill(T::zero());
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let patch = &gb[(oy * g.wo + ox) * row..][..row];
                    for (t, at) in g.taps(oy, ox) {
                        let (dst, src) = (&mut acc[at * g.c..][..g.c], &patch[t * g.c..][..g.c]);
                        for (a, &v) in dst.iter_mut().zip(src) {
                            *a += v;
                        }
                    }
                }
            }
            transpose_into(&acc, dx, hw, g.c);
        }
    });
    Ok(storage(out, (g.b, g.c, g.h, g.w)))
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, col2im(&self.0, s, l))
    }
}

/// `[B, M, N]` -> `[B, N, M]` (each image's matrix transposed); its backward is the transpose
/// back.
struct Transpose {
    b: usize,
    m: usize,
    n: usize,
}

/// Side of the square tiles the transpose copies (both tiles stay in L1).
const TILE: usize = 32;

fn transpose_fwd<T: WithDType>(
    op: &Transpose,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "transpose")?;
    let (m, n) = (op.m, op.n);
    let mut out = vec![T::zero(); op.b * m * n];
    par_items(&mut out, m * n, |first, mats| {
        for (i, y) in mats.chunks_mut(m * n).enumerate() {
            transpose_into(&x[(first + i) * m * n..][..m * n], y, m, n);
        }
    });
    Ok(storage(out, (op.b, op.n, op.m)))
}

/// `dst [n, m] = src [m, n]^T`, in tiles.
fn transpose_into<T: Copy>(src: &[T], dst: &mut [T], m: usize, n: usize) {
    for r0 in (0..m).step_by(TILE) {
        for c0 in (0..n).step_by(TILE) {
            for c in c0..(c0 + TILE).min(n) {
                for r in r0..(r0 + TILE).min(m) {
                    dst[c * m + r] = src[r * n + c];
                }
            }
        }
    }
}

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose-bmn"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, transpose_fwd(self, s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Transpose {
            b: self.b,
            m: self.n,
            n: self.m,
        };
        Ok(Some(
            grad.contiguous()?.apply_op1(back)?.reshape(x.shape())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// im2col against the same patches cut with candle's pad + narrow + cat (forward), and its
    /// backward against candle's backward of that composition; the layout ops against permute.
    #[test]
    fn im2col_and_transposes_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for &(k, s, p, h, w) in &[
            (3, 1, 1, 5, 7),
            (3, 2, 1, 7, 6),
            (1, 2, 0, 5, 5),
            (2, 1, 0, 4, 3),
        ] {
            let x = Var::from_tensor(
                &Tensor::arange(0f64, (2 * 3 * h * w) as f64, &dev)?
                    .reshape((2, 3, h, w))?
                    .affine(0.37, -2.0)?
                    .sin()?,
            )?;
            let cols = im2col(x.as_tensor(), k, s, p)?;
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let xl = x.as_tensor().permute((0, 2, 3, 1))?;
            let xl = xl
                .pad_with_zeros(1, p, p + s)?
                .pad_with_zeros(2, p, p + s)?;
            let mut taps = vec![];
            for kh in 0..k {
                for kw in 0..k {
                    let mut t = xl.narrow(1, kh, ho * s)?.narrow(2, kw, wo * s)?;
                    t = t.reshape((2, ho, s, wo, s, 3))?;
                    t = t
                        .narrow(2, 0, 1)?
                        .narrow(4, 0, 1)?
                        .reshape((2, ho, wo, 3))?;
                    taps.push(t.contiguous()?);
                }
            }
            let want = Tensor::cat(&taps, 3)?;
            assert_eq!(cols.dims(), want.dims());
            let d = (&cols - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert_eq!(d, 0.0, "k{k} s{s} p{p}");
            let r = Tensor::arange(0f64, cols.elem_count() as f64, &dev)?
                .reshape(cols.dims())?
                .cos()?;
            let g1 = (cols * &r)?.sum_all()?.backward()?;
            let g2 = (want * &r)?.sum_all()?.backward()?;
            let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(d < 1e-12, "k{k} s{s} p{p}: col2im off by {d}");
        }
        // layouts: 40x37 spans more than one tile each way
        let x = Var::from_tensor(
            &Tensor::arange(0f32, (2 * 40 * 37 * 3) as f32, &dev)?.reshape((2, 40, 37, 3))?,
        )?;
        let y = channels_last(x.as_tensor())?;
        let want = x.as_tensor().permute((0, 2, 3, 1))?.contiguous()?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let back = channels_first(&y)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );
        let r = Tensor::arange(0f32, y.elem_count() as f32, &dev)?.reshape(y.dims())?;
        let g = (y * &r)?.sum_all()?.backward()?;
        let gx = g.get(&x).unwrap();
        let want = r.permute((0, 3, 1, 2))?.contiguous()?;
        assert_eq!(
            gx.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}

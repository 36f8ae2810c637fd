//! Launch wrappers for kernels/*.cu, one per kernel family, independent of the device: each picks
//! the launch shape the .cu file documents and builds the argument list in the kernel's parameter
//! order. The emulator runs them on host memory today; the CUDA runtime will pass the same
//! `KernelArgs` to cuLaunchKernel.
//!
//! Every function is `unsafe`: the caller guarantees that each pointer addresses device memory of
//! the size stated in the doc comment (elements of the kernel's dtype unless marked f32/u32/i64/u8).

use crate::device::cpu::attention::{AttnDims, AttnDropout};
use crate::device::launch::{DevPtr, KDType, KernelArgs, KernelDevice, LaunchConfig, Launcher};
use crate::error::{Error, Result};

/// Grid cap for grid-stride kernels (about 8 blocks per SM on a 132-SM H100).
pub const MAX_BLOCKS: u32 = 1024;

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} exceeds the kernels' i32")))
}

fn blocks(work: usize, per_block: usize, cap: u32) -> u32 {
    (work.div_ceil(per_block).max(1) as u64).min(cap as u64) as u32
}

fn name(op: &str, dt: KDType) -> String {
    format!("{op}_{}", dt.suffix())
}

/// LayerNorm forward. x, y [rows, dim]; gamma, beta \[dim\]; mean, rstd \[rows\] f32.
///
/// # Safety
/// See the module documentation.
pub unsafe fn layernorm_fwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    gamma: DevPtr,
    beta: DevPtr,
    y: DevPtr,
    mean: DevPtr,
    rstd: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(rows, 8, u32::MAX), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x).arg(gamma).arg(beta).arg(y).arg(mean).arg(rstd);
    a.arg(int(rows, "rows")?).arg(int(dim, "dim")?).arg(eps);
    l.launch(&name("layernorm_fwd", dt), &cfg, &mut a)
}

/// LayerNorm backward. x, dy, dx [rows, dim]; gamma \[dim\]; mean, rstd \[rows\] f32;
/// dgamma, dbeta \[dim\] f32 (accumulated).
///
/// # Safety
/// See the module documentation.
pub unsafe fn layernorm_bwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    gamma: DevPtr,
    mean: DevPtr,
    rstd: DevPtr,
    dy: DevPtr,
    dx: DevPtr,
    dgamma: DevPtr,
    dbeta: DevPtr,
    rows: usize,
    dim: usize,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let smem = int(2 * dim * 4, "layernorm shared bytes")? as u32;
    let cfg = LaunchConfig::linear(blocks(rows, 8, MAX_BLOCKS), 256, smem);
    let mut a = KernelArgs::new();
    a.arg(x)
        .arg(gamma)
        .arg(mean)
        .arg(rstd)
        .arg(dy)
        .arg(dx)
        .arg(dgamma)
        .arg(dbeta);
    a.arg(int(rows, "rows")?).arg(int(dim, "dim")?);
    l.launch(&name("layernorm_bwd", dt), &cfg, &mut a)
}

/// x \[n\] f32 -> y \[n\] in `dt`: a copy for f32 (y may not alias x), round to nearest even for
/// bf16 (`cast_f32_bf16`, as `half::bf16::from_f32`).
///
/// # Safety
/// See the module documentation.
pub unsafe fn cast_from_f32(
    l: &dyn KernelDevice,
    dt: KDType,
    x: DevPtr,
    y: DevPtr,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    match dt {
        KDType::F32 => l.copy_d2d(x, y, n * 4),
        KDType::BF16 => {
            let cfg = LaunchConfig::linear(blocks(n, 256, MAX_BLOCKS), 256, 0);
            let mut a = KernelArgs::new();
            a.arg(x).arg(y).arg(n as i64);
            l.launch("cast_f32_bf16", &cfg, &mut a)
        }
    }
}

/// GELU (exact erf) forward over n elements.
///
/// # Safety
/// See the module documentation.
pub unsafe fn gelu_fwd(l: &dyn Launcher, dt: KDType, x: DevPtr, y: DevPtr, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(n, 256, MAX_BLOCKS), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x).arg(y).arg(n as i64);
    l.launch(&name("gelu_fwd", dt), &cfg, &mut a)
}

/// GELU backward: dx = dy * gelu'(x), n elements.
///
/// # Safety
/// See the module documentation.
pub unsafe fn gelu_bwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    dy: DevPtr,
    dx: DevPtr,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(n, 256, MAX_BLOCKS), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x).arg(dy).arg(dx).arg(n as i64);
    l.launch(&name("gelu_bwd", dt), &cfg, &mut a)
}

/// y = gelu(x + bias): x, y [rows, dim]; bias \[dim\].
///
/// # Safety
/// See the module documentation.
pub unsafe fn bias_gelu_fwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    bias: DevPtr,
    y: DevPtr,
    rows: usize,
    dim: usize,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    int(rows * dim, "rows * dim")?;
    let cfg = LaunchConfig::linear(blocks(rows * dim, 256, MAX_BLOCKS), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x)
        .arg(bias)
        .arg(y)
        .arg(int(rows, "rows")?)
        .arg(int(dim, "dim")?);
    l.launch(&name("bias_gelu_fwd", dt), &cfg, &mut a)
}

/// Backward of [`bias_gelu_fwd`]: dx [rows, dim] assigned, dbias \[dim\] f32 accumulated.
///
/// # Safety
/// See the module documentation.
pub unsafe fn bias_gelu_bwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    bias: DevPtr,
    dy: DevPtr,
    dx: DevPtr,
    dbias: DevPtr,
    rows: usize,
    dim: usize,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let smem = int(dim * 4, "bias_gelu shared bytes")? as u32;
    let cfg = LaunchConfig::linear(blocks(rows, 8, MAX_BLOCKS), 256, smem);
    let mut a = KernelArgs::new();
    a.arg(x).arg(bias).arg(dy).arg(dx).arg(dbias);
    a.arg(int(rows, "rows")?).arg(int(dim, "dim")?);
    l.launch(&name("bias_gelu_bwd", dt), &cfg, &mut a)
}

/// Dropout parameters of a fused kernel: keep element i when `hash_unit(seed, stream, i) >= p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HashDropout {
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
}

/// z = Dropout(a + bias) + res; y = LN(z) (kernels/encoder.cu). a, res, z, y [rows, dim]; bias,
/// gamma, beta \[dim\]; mean, rstd \[rows\] f32. bias, res, z, mean and rstd may be NULL (z, mean,
/// rstd are only needed by a backward).
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn residual_layernorm_fwd(
    l: &dyn Launcher,
    dt: KDType,
    a: DevPtr,
    bias: DevPtr,
    res: DevPtr,
    gamma: DevPtr,
    beta: DevPtr,
    z: DevPtr,
    y: DevPtr,
    mean: DevPtr,
    rstd: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
    drop: Option<HashDropout>,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    int(rows * dim, "rows * dim")?;
    let d = drop.unwrap_or(HashDropout {
        p: 0.0,
        seed: 0,
        stream: 0,
    });
    let cfg = LaunchConfig::linear(blocks(rows, 8, u32::MAX), 256, 0);
    let mut args = KernelArgs::new();
    args.arg(a).arg(bias).arg(res).arg(gamma).arg(beta);
    args.arg(z).arg(y).arg(mean).arg(rstd);
    args.arg(int(rows, "rows")?).arg(int(dim, "dim")?).arg(eps);
    args.arg(d.p).arg(d.seed).arg(d.stream);
    l.launch(&name("residual_layernorm_fwd", dt), &cfg, &mut args)
}

/// y = x * keep(i) / (1 - p) over n elements (y may be x).
///
/// # Safety
/// See the module documentation.
pub unsafe fn dropout_fwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    y: DevPtr,
    n: usize,
    d: HashDropout,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(n, 256, MAX_BLOCKS), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x)
        .arg(y)
        .arg(n as i64)
        .arg(d.p)
        .arg(d.seed)
        .arg(d.stream);
    l.launch(&name("dropout_fwd", dt), &cfg, &mut a)
}

/// x [rows, dim] += bias \[dim\] per row, in place.
///
/// # Safety
/// See the module documentation.
pub unsafe fn add_bias(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    bias: DevPtr,
    rows: usize,
    dim: usize,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    int(rows * dim, "rows * dim")?;
    let cfg = LaunchConfig::linear(blocks(rows * dim, 256, MAX_BLOCKS), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x)
        .arg(bias)
        .arg(int(rows, "rows")?)
        .arg(int(dim, "dim")?);
    l.launch(&name("add_bias", dt), &cfg, &mut a)
}

/// db \[dim\] f32 += column sums of dy [rows, dim] (bias gradients).
///
/// # Safety
/// See the module documentation.
pub unsafe fn colsum(
    l: &dyn Launcher,
    dt: KDType,
    dy: DevPtr,
    db: DevPtr,
    rows: usize,
    dim: usize,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    int(rows * dim, "rows * dim")?;
    let cfg = LaunchConfig {
        grid: [dim.div_ceil(32) as u32, blocks(rows, 64, 64), 1],
        block: [32, 8, 1],
        shared_bytes: 0,
    };
    let mut a = KernelArgs::new();
    a.arg(dy)
        .arg(db)
        .arg(int(rows, "rows")?)
        .arg(int(dim, "dim")?);
    l.launch(&name("colsum", dt), &cfg, &mut a)
}

/// Embedding gather: table [vocab, dim], ids \[n\] u32, out [n, dim] (ids >= vocab give zeros).
///
/// # Safety
/// See the module documentation.
pub unsafe fn gather_fwd(
    l: &dyn Launcher,
    dt: KDType,
    table: DevPtr,
    ids: DevPtr,
    out: DevPtr,
    n: usize,
    dim: usize,
    vocab: usize,
) -> Result<()> {
    if n == 0 || dim == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(n, 4, u32::MAX), 128, 0);
    let mut a = KernelArgs::new();
    a.arg(table).arg(ids).arg(out);
    a.arg(int(n, "n")?)
        .arg(int(dim, "dim")?)
        .arg(int(vocab, "vocab")?);
    l.launch(&name("gather_fwd", dt), &cfg, &mut a)
}

/// Embedding scatter-add: dtable[ids\[i\]] += dout\[i\] (f32 dtable [vocab, dim]); rows whose id is
/// `padding_idx` are skipped.
///
/// # Safety
/// See the module documentation.
pub unsafe fn gather_bwd(
    l: &dyn Launcher,
    dt: KDType,
    dout: DevPtr,
    ids: DevPtr,
    dtable: DevPtr,
    n: usize,
    dim: usize,
    vocab: usize,
    padding_idx: Option<u32>,
) -> Result<()> {
    if n == 0 || dim == 0 {
        return Ok(());
    }
    let pad = match padding_idx {
        Some(p) => int(p as usize, "padding_idx")?,
        None => -1,
    };
    let cfg = LaunchConfig::linear(blocks(n, 4, u32::MAX), 128, 0);
    let mut a = KernelArgs::new();
    a.arg(dout).arg(ids).arg(dtable);
    a.arg(int(n, "n")?)
        .arg(int(dim, "dim")?)
        .arg(int(vocab, "vocab")?)
        .arg(pad);
    l.launch(&name("gather_bwd", dt), &cfg, &mut a)
}

/// Row L2 normalisation forward: x, y [rows, dim].
///
/// # Safety
/// See the module documentation.
pub unsafe fn l2_normalize_fwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    y: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(rows, 8, u32::MAX), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x)
        .arg(y)
        .arg(int(rows, "rows")?)
        .arg(int(dim, "dim")?)
        .arg(eps);
    l.launch(&name("l2_normalize_fwd", dt), &cfg, &mut a)
}

/// Row L2 normalisation backward: x, dy, dx [rows, dim].
///
/// # Safety
/// See the module documentation.
pub unsafe fn l2_normalize_bwd(
    l: &dyn Launcher,
    dt: KDType,
    x: DevPtr,
    dy: DevPtr,
    dx: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(rows, 8, u32::MAX), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(x)
        .arg(dy)
        .arg(dx)
        .arg(int(rows, "rows")?)
        .arg(int(dim, "dim")?)
        .arg(eps);
    l.launch(&name("l2_normalize_bwd", dt), &cfg, &mut a)
}

/// Cross-entropy forward: logits [rows, classes], targets \[rows\] i64 (-100 ignored); writes
/// lse \[rows\] f32, row_loss \[rows\] f32 and stats \[2\] f32 = (mean loss, counted rows).
///
/// # Safety
/// See the module documentation.
pub unsafe fn cross_entropy_fwd(
    l: &dyn Launcher,
    dt: KDType,
    logits: DevPtr,
    targets: DevPtr,
    lse: DevPtr,
    row_loss: DevPtr,
    stats: DevPtr,
    rows: usize,
    classes: usize,
) -> Result<()> {
    let (r, c) = (int(rows, "rows")?, int(classes, "classes")?);
    if rows > 0 && classes > 0 {
        let cfg = LaunchConfig::linear(blocks(rows, 1, u32::MAX), 256, 0);
        let mut a = KernelArgs::new();
        a.arg(logits)
            .arg(targets)
            .arg(lse)
            .arg(row_loss)
            .arg(r)
            .arg(c);
        l.launch(&name("cross_entropy_fwd", dt), &cfg, &mut a)?;
    }
    let mut a = KernelArgs::new();
    a.arg(row_loss).arg(targets).arg(r).arg(stats);
    l.launch(
        "cross_entropy_reduce",
        &LaunchConfig::linear(1, 256, 0),
        &mut a,
    )
}

/// Cross-entropy backward: dlogits [rows, classes] = g / count * (softmax - onehot) on counted
/// rows, 0 elsewhere, reading lse \[rows\] f32 and stats \[2\] f32 from the forward. dlogits may be
/// the logits buffer itself.
///
/// # Safety
/// See the module documentation.
pub unsafe fn cross_entropy_bwd(
    l: &dyn Launcher,
    dt: KDType,
    logits: DevPtr,
    targets: DevPtr,
    lse: DevPtr,
    stats: DevPtr,
    g: f32,
    dlogits: DevPtr,
    rows: usize,
    classes: usize,
) -> Result<()> {
    if rows == 0 || classes == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(blocks(rows, 1, u32::MAX), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(logits)
        .arg(targets)
        .arg(lse)
        .arg(stats)
        .arg(g)
        .arg(dlogits);
    a.arg(int(rows, "rows")?).arg(int(classes, "classes")?);
    l.launch(&name("cross_entropy_bwd", dt), &cfg, &mut a)
}

/// AdamW hyper-parameters of one fused step (bias corrections from `step`, counted from 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_norm: f32,
    /// Every gradient is multiplied by this first (1: as is).
    pub grad_scale: f32,
}

/// Fused AdamW over param, grad, m, v \[n\] f32; decay_mask \[n\] u8 or NULL (decay all); sumsq \[1\]
/// f32 from [`grad_sumsq`] or NULL (no clipping); `copy`: \[n\] elements of that type that receive
/// the updated parameters too (the compute copy of a device trainer), or None.
///
/// # Safety
/// See the module documentation.
pub unsafe fn adamw(
    l: &dyn Launcher,
    param: DevPtr,
    grad: DevPtr,
    m: DevPtr,
    v: DevPtr,
    decay_mask: DevPtr,
    sumsq: DevPtr,
    copy: Option<(DevPtr, KDType)>,
    n: usize,
    h: &AdamWStep,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let t = i32::try_from(h.step.max(1)).unwrap_or(i32::MAX);
    let bc1 = (1.0 - (h.beta1 as f64).powi(t)) as f32;
    let bc2 = (1.0 - (h.beta2 as f64).powi(t)) as f32;
    let cfg = LaunchConfig::linear(blocks(n, 256, MAX_BLOCKS), 256, 0);
    let mut a = KernelArgs::new();
    a.arg(param)
        .arg(grad)
        .arg(m)
        .arg(v)
        .arg(decay_mask)
        .arg(n as i64);
    a.arg(h.lr)
        .arg(h.beta1)
        .arg(h.beta2)
        .arg(h.eps)
        .arg(h.weight_decay);
    a.arg(bc1)
        .arg(bc2)
        .arg(sumsq)
        .arg(h.max_norm)
        .arg(h.grad_scale);
    let (c16, c32) = match copy {
        None => (DevPtr::NULL, DevPtr::NULL),
        Some((p, KDType::BF16)) => (p, DevPtr::NULL),
        Some((p, KDType::F32)) => (DevPtr::NULL, p),
    };
    a.arg(c16).arg(c32);
    l.launch("adamw_f32", &cfg, &mut a)
}

/// Number of f32 partials [`grad_sumsq`] needs as scratch for n elements.
pub fn grad_sumsq_partials(n: usize) -> usize {
    blocks(n, 256, MAX_BLOCKS) as usize
}

/// sumsq\[0\] = Σ g² over g \[n\] f32, via partials [grad_sumsq_partials(n)] f32 (deterministic).
///
/// # Safety
/// See the module documentation.
pub unsafe fn grad_sumsq(
    l: &dyn Launcher,
    g: DevPtr,
    partials: DevPtr,
    sumsq: DevPtr,
    n: usize,
) -> Result<()> {
    let nb = grad_sumsq_partials(n);
    let mut a = KernelArgs::new();
    a.arg(g).arg(n as i64).arg(partials);
    l.launch(
        "grad_sumsq_partial_f32",
        &LaunchConfig::linear(nb as u32, 256, 0),
        &mut a,
    )?;
    let mut a = KernelArgs::new();
    a.arg(partials).arg(nb as i32).arg(sumsq);
    l.launch("sum_final_f32", &LaunchConfig::linear(1, 256, 0), &mut a)
}

/// The mask of a fused attention launch, on device addresses (kernels/attention.cu; the CPU twin
/// is `cpu::attention::AttnMask`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttnKernelMask {
    /// Key padding: key_mask [B, Lk] u8 (1 = real token), or NULL when nothing is padded.
    KeyPadding { key_mask: DevPtr },
    /// The RetroMAE decoder's position-specific mask (SPEC §10.3), generated in the kernel:
    /// key_mask [B, Lk] u8, words [B, Lk] u32 (whole-word index of each key).
    TwoStream {
        key_mask: DevPtr,
        words: DevPtr,
        p: f32,
        seed: u64,
    },
}

/// Query rows (forward, dq) or keys (dkdv) one attention block owns: 4 warps x rows per warp
/// (`rows_per_warp<D>()` in kernels/attention.cu).
fn attn_rows_per_block(head_dim: usize) -> usize {
    4 * if head_dim >= 128 { 2 } else { 4 }
}

/// Checks the dims and returns the grid for `rows` rows and the arguments: the tensors `ptrs`
/// first, then the sizes, mask and dropout parameters every attention kernel takes.
fn attn_launch(
    ptrs: &[DevPtr],
    rows: usize,
    d: &AttnDims,
    scale: f32,
    mask: AttnKernelMask,
    drop: Option<AttnDropout>,
) -> Result<(LaunchConfig, KernelArgs)> {
    if !matches!(d.head_dim, 32 | 64 | 128) {
        return Err(Error::Unsupported {
            op: format!(
                "fused attention with head_dim {} (kernels: 32, 64, 128)",
                d.head_dim
            ),
            device: "cuda/emu".into(),
        });
    }
    if d.heads > 65_535 || d.batch > 65_535 {
        return Err(Error::invalid(format!(
            "attention grid: heads {} and batch {} must be <= 65535",
            d.heads, d.batch
        )));
    }
    int(
        d.batch * d.q_len.max(d.k_len) * d.width(),
        "attention tensor size",
    )?;
    let (mode, key_mask, words, p, seed) = match mask {
        AttnKernelMask::KeyPadding { key_mask } => (0i32, key_mask, DevPtr::NULL, 0f32, 0u64),
        AttnKernelMask::TwoStream {
            key_mask,
            words,
            p,
            seed,
        } => (1, key_mask, words, p, seed),
    };
    let drop = drop.unwrap_or(AttnDropout {
        p: 0.0,
        seed: 0,
        stream: 0,
    });
    let cfg = LaunchConfig {
        grid: [
            blocks(rows, attn_rows_per_block(d.head_dim), u32::MAX),
            d.heads as u32,
            d.batch as u32,
        ],
        block: [128, 1, 1],
        shared_bytes: 0,
    };
    let mut a = KernelArgs::new();
    for &p in ptrs {
        a.arg(p);
    }
    a.arg(int(d.heads, "heads")?)
        .arg(int(d.q_len, "q_len")?)
        .arg(int(d.k_len, "k_len")?)
        .arg(scale)
        .arg(mode)
        .arg(key_mask)
        .arg(words)
        .arg(p)
        .arg(seed)
        .arg(drop.p)
        .arg(drop.seed)
        .arg(drop.stream);
    Ok((cfg, a))
}

/// Which forward attention kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnImpl {
    /// `attention_fwd_d{D}_{f32,bf16}`: f32 FMAs on CUDA cores (any storage).
    CudaCores,
    /// `attention_fwd_tc_d{D}_bf16`: mma.sync bf16 tensor cores, FlashAttention-2's forward
    /// (bf16 storage only), heads per block chosen by [`tc_heads_per_block`].
    TensorCores,
    /// [`AttnImpl::TensorCores`] with this many heads per block (a divisor of the heads):
    /// selftest and benchmarks.
    TensorCoresHeads(usize),
    /// `attention_fwd_tcdb_d{D}_bf16`: the tensor-core forward with two K/V tile buffers, the
    /// next tile arriving by cp.async during this one's products; head dims 32 and 64 (heads
    /// per block as [`tc_heads_per_block_for`] with `pipelined`). The default where it applies
    /// ([`TC_PIPELINED_BY_DEFAULT`]).
    TensorCoresPipelined,
    /// [`AttnImpl::TensorCoresPipelined`] with this many heads per block (as
    /// [`AttnImpl::TensorCoresHeads`]).
    TensorCoresPipelinedHeads(usize),
}

/// Whether [`attention_fwd`] takes the double-buffered tensor-core forward where it applies
/// (head dims 32 and 64). On since session 9's H200 call: `bench kernels` (rows
/// `attention_fwd_tcdb*` beside `attention_fwd_tc*`, same call) measured it 2.2x / 2.0x the
/// single-buffered plain / two-stream forward at S512 and its selftest rows passed there; the
/// selftest checks both either way.
pub const TC_PIPELINED_BY_DEFAULT: bool = true;

/// Keys of one tensor-core tile (kTcKeys in kernels/attention.cu).
const TC_KEYS: usize = 64;

/// Bytes of the two-stream mask cache per key tile of a tensor-core forward block: 32 bits for
/// each of its 128 threads (kernels/attention.cu, dynamic shared memory).
const TC_MASK_TILE_BYTES: usize = 512;

/// The largest static shared memory of the tensor-core forward kernels (ptxas 13.0: 37,504 bytes,
/// the double-buffered two-stream one at head dim 64), rounded up.
const TC_FWD_STATIC_SMEM: usize = 38 << 10;

/// Key tiles whose two-stream mask bits a tensor-core forward block keeps (the first ones; the
/// block's heads draw for themselves past them) on a device with `smem_per_sm` bytes of shared
/// memory per SM: as many as leave the kernel's resident blocks per SM (3 at head dims up to 64,
/// 2 at 128: their registers' limit) each its static memory, the cache and the 1 KB the driver
/// reserves. H100 / H200 (228 KB): 74 tiles (Lk 4736) at head dims up to 64, 150 at 128.
pub fn tc_mask_tiles(head_dim: usize, smem_per_sm: usize) -> usize {
    let blocks = if head_dim >= 128 { 2 } else { 3 };
    (smem_per_sm / blocks).saturating_sub(1024 + TC_FWD_STATIC_SMEM) / TC_MASK_TILE_BYTES
}

/// Key tiles up to which the mask cache is the default ([`tc_heads_per_block_cached`]): what
/// session 10's H200 call measured (Lk <= 1024 for the double-buffered kernel at head dim 64;
/// 2048 single-buffered up to head dim 64, 1024 at 128: the static bits' limits of the kernels
/// measured then). Longer keys run one head per block until `bench kernels`' `_hpb` rows at
/// S >= 2048 show the cache ahead there ([`tc_heads_per_block_options`] lets them run).
fn tc_mask_tiles_default(head_dim: usize, pipelined: bool) -> usize {
    if head_dim >= 128 || (pipelined && head_dim >= 64) {
        16
    } else {
        32
    }
}

/// Dynamic shared memory of a tensor-core forward launch: the mask cache's bits when a block
/// runs several heads of the two-stream mask (for at most `cache_tiles` key tiles, the first;
/// the kernel reads how many from the launch), else none.
fn tc_fwd_shared_bytes(two_stream: bool, hpb: usize, k_len: usize, cache_tiles: usize) -> usize {
    if two_stream && hpb > 1 {
        k_len.div_ceil(TC_KEYS).min(cache_tiles) * TC_MASK_TILE_BYTES
    } else {
        0
    }
}

/// The tensor-core forward's entry point (kernels/attention.cu): key padding
/// `attention_fwd_tc{db}_d{D}_bf16`, two-stream `attention_fwd_tc{db}_twostream_d{D}_bf16`
/// (`db` for the double-buffered kernels).
pub fn tc_fwd_kernel(two_stream: bool, head_dim: usize, pipelined: bool) -> String {
    let db = if pipelined { "db" } else { "" };
    let ts = if two_stream { "_twostream" } else { "" };
    format!("attention_fwd_tc{db}{ts}_d{head_dim}_bf16")
}

/// The forward kernel [`attention_fwd`] takes: the tensor cores for bf16 with 16-byte aligned
/// q, k, v (double-buffered at head dims 32 / 64 when [`TC_PIPELINED_BY_DEFAULT`]), else the
/// CUDA cores.
pub fn attention_fwd_default(
    dt: KDType,
    head_dim: usize,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    out: DevPtr,
) -> AttnImpl {
    match dt {
        KDType::BF16 if tc_aligned(&[q, k, v], &[out]) => {
            if TC_PIPELINED_BY_DEFAULT && matches!(head_dim, 32 | 64) {
                AttnImpl::TensorCoresPipelined
            } else {
                AttnImpl::TensorCores
            }
        }
        _ => AttnImpl::CudaCores,
    }
}

/// Whether the two-stream tensor-core forward shares each drawn visibility between several heads
/// of a block by default ([`tc_heads_per_block_for`]), for the single-buffered and the
/// double-buffered kernel. Measured side by side on an H200 (session 10, `bench kernels`, two-stream
/// / key-padding throughput at S512 / 1024, B·S = 16k, 16 heads of 64; the draw one folded product
/// per score): double-buffered 0.84 / 0.84 with one head per block, 0.89 / 0.87 with 4 (that
/// kernel is bound by its instruction issue, so the draw it saves counts); single-buffered 0.93 /
/// 0.93 with one head, 0.85 / 0.84 with 4 (that one waits on its loads, and the 4x longer blocks
/// lose more to the last wave of the grid than the shared draw saves). A head that draws for
/// itself puts each draw straight into its select (no bits stored or read back).
pub const TC_MASK_CACHE_BY_DEFAULT: [bool; 2] = [false, true];

/// Heads per block of the tensor-core forward ([`tc_heads_per_block_for`], single-buffered).
pub fn tc_heads_per_block(mask: AttnKernelMask, d: &AttnDims) -> usize {
    tc_heads_per_block_for(mask, d, false)
}

/// Heads per block of the tensor-core forward: with [`TC_MASK_CACHE_BY_DEFAULT`] for this kernel
/// the largest the mask cache allows and the grid affords ([`tc_heads_per_block_cached`]), else 1.
pub fn tc_heads_per_block_for(mask: AttnKernelMask, d: &AttnDims, pipelined: bool) -> usize {
    if TC_MASK_CACHE_BY_DEFAULT[usize::from(pipelined)] {
        tc_heads_per_block_cached(mask, d, pipelined)
    } else {
        1
    }
}

/// With the mask cache: for the two-stream mask one block draws each (row, key) visibility once
/// for up to 4 heads (the mask does not depend on the head), as long as the grid keeps >= 1024
/// blocks (~8 per SM of an H100/H200) and Lk is within the lengths measured so far (1024 for
/// the double-buffered kernel at head dim 64); otherwise, and for key padding, one head per block.
pub fn tc_heads_per_block_cached(mask: AttnKernelMask, d: &AttnDims, pipelined: bool) -> usize {
    if !matches!(mask, AttnKernelMask::TwoStream { .. })
        || d.k_len.div_ceil(TC_KEYS) > tc_mask_tiles_default(d.head_dim, pipelined)
    {
        return 1;
    }
    let blocks = d.q_len.div_ceil(64) * d.batch * d.heads;
    [4, 2]
        .into_iter()
        .find(|&n| d.heads.is_multiple_of(n) && blocks / n >= 1024)
        .unwrap_or(1)
}

/// The heads per block worth timing for the tensor-core forward at these dims (ascending): 1,
/// and for the two-stream mask 2 and 4 where they divide the heads (the mask cache then holds
/// the first [`tc_mask_tiles`] key tiles, all of them up to Lk 4736 on an H100 / H200).
pub fn tc_heads_per_block_options(mask: AttnKernelMask, d: &AttnDims) -> Vec<usize> {
    if !matches!(mask, AttnKernelMask::TwoStream { .. }) {
        return vec![1];
    }
    [1, 2, 4]
        .into_iter()
        .filter(|&n| d.heads.is_multiple_of(n))
        .collect()
}

/// Fused attention forward (`cpu::attention::attention_fwd`): q [B, Lq, H*D], k, v [B, Lk, H*D],
/// out [B, Lq, H*D]; lse [B, H, Lq] f32. Head dims 32, 64, 128. bf16 runs on tensor cores.
///
/// # Safety
/// See the module documentation; the mask pointers address [B, Lk] u8 / u32 (or NULL key_mask).
pub unsafe fn attention_fwd(
    l: &dyn Launcher,
    dt: KDType,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    out: DevPtr,
    lse: DevPtr,
    mask: AttnKernelMask,
    d: &AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
) -> Result<()> {
    let imp = attention_fwd_default(dt, d.head_dim, q, k, v, out);
    // SAFETY: forwarded contract.
    unsafe { attention_fwd_with(l, imp, dt, q, k, v, out, lse, mask, d, scale, drop) }
}

/// Whether the tensors the tensor-core attention kernels load 16 bytes at a time (K/V tiles in
/// the forward and dQ kernels, Q/dO tiles in the dK/dV kernel) start 16-byte aligned (their rows
/// then are too: H·D bf16 with D % 8 == 0). Buffers of the device allocators are; a view at an
/// odd row offset of a one-head D = 32 tensor could be 8-byte aligned only.
/// The tensors they store (or, for the forward's `out` in the backward, load) a bf16 pair at a
/// time, `words`, must start 4-byte aligned.
fn tc_aligned(ptrs: &[DevPtr], words: &[DevPtr]) -> bool {
    ptrs.iter().all(|p| p.0 % 16 == 0) && words.iter().all(|p| p.0 % 4 == 0)
}

fn tc_alignment_error(what: &str) -> Error {
    Error::invalid(format!(
        "tensor-core attention {what}: q, k, v (and dout) must be 16-byte aligned, out (and dq, \
         dk, dv) 4-byte aligned"
    ))
}

/// [`attention_fwd`] with the kernel chosen by the caller (selftest and benchmarks run both).
///
/// # Safety
/// As [`attention_fwd`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_fwd_with(
    l: &dyn Launcher,
    imp: AttnImpl,
    dt: KDType,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    out: DevPtr,
    lse: DevPtr,
    mask: AttnKernelMask,
    d: &AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
) -> Result<()> {
    if d.batch == 0 || d.q_len == 0 || d.heads == 0 {
        return Ok(());
    }
    if d.k_len == 0 {
        return Err(Error::invalid("attention over zero keys"));
    }
    let (mut cfg, mut a) = attn_launch(&[q, k, v, out, lse], d.q_len, d, scale, mask, drop)?;
    match imp {
        AttnImpl::CudaCores => {
            let op = format!("attention_fwd_d{}", d.head_dim);
            l.launch(&name(&op, dt), &cfg, &mut a)
        }
        AttnImpl::TensorCores
        | AttnImpl::TensorCoresHeads(_)
        | AttnImpl::TensorCoresPipelined
        | AttnImpl::TensorCoresPipelinedHeads(_) => {
            if dt != KDType::BF16 {
                return Err(Error::Unsupported {
                    op: "tensor-core attention with f32 storage (bf16 only)".into(),
                    device: "cuda/emu".into(),
                });
            }
            if !tc_aligned(&[q, k, v], &[out]) {
                return Err(tc_alignment_error("forward"));
            }
            let pipelined = matches!(
                imp,
                AttnImpl::TensorCoresPipelined | AttnImpl::TensorCoresPipelinedHeads(_)
            );
            if pipelined && !matches!(d.head_dim, 32 | 64) {
                return Err(Error::Unsupported {
                    op: format!(
                        "double-buffered tensor-core attention at head dim {} (32 or 64)",
                        d.head_dim
                    ),
                    device: "cuda/emu".into(),
                });
            }
            let hpb = match imp {
                AttnImpl::TensorCoresHeads(n) | AttnImpl::TensorCoresPipelinedHeads(n) => n,
                _ => tc_heads_per_block_for(mask, d, pipelined),
            };
            let two_stream = matches!(mask, AttnKernelMask::TwoStream { .. });
            if hpb == 0 || !d.heads.is_multiple_of(hpb) {
                return Err(Error::invalid(format!(
                    "tensor-core attention: {hpb} heads per block for {} heads (a divisor of \
                     the heads)",
                    d.heads
                )));
            }
            // 4 warps x 16 query rows per block (kernels/attention.cu, kTcRows); hpb heads each.
            cfg.grid[0] = blocks(d.q_len, 64, u32::MAX);
            cfg.grid[1] = (d.heads / hpb) as u32;
            let cache_tiles = tc_mask_tiles(d.head_dim, l.shared_memory_per_multiprocessor());
            cfg.shared_bytes = tc_fwd_shared_bytes(two_stream, hpb, d.k_len, cache_tiles) as u32;
            l.launch(
                &tc_fwd_kernel(two_stream, d.head_dim, pipelined),
                &cfg,
                &mut a,
            )
        }
    }
}

/// Whether [`attention_bwd`] runs the tensor-core kernels for bf16 at head dims 32 and 64. On
/// since session 9's H200 call: their 30 `selftest --device cuda` rows passed and `bench kernels`
/// measured forward + backward 4.9x the CUDA-core backward's at S512 (docs/gpu-log.md). The
/// selftest and `bench kernels` run both regardless; the environment variable
/// `RETROM3_ATTN_BWD=tc` (or `cc`) overrides the default for a run ([`tc_backward`]).
pub const TC_BACKWARD_BY_DEFAULT: bool = true;

/// Whether [`attention_bwd`] takes the tensor-core kernels where they apply:
/// `RETROM3_ATTN_BWD` = `tc` or `cc` when set (read once per process), else
/// [`TC_BACKWARD_BY_DEFAULT`]. Any other value is an error naming the variable.
pub fn tc_backward() -> Result<bool> {
    static CHOICE: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var("RETROM3_ATTN_BWD") {
            Err(_) => Ok(TC_BACKWARD_BY_DEFAULT),
            Ok(v) if v == "tc" => Ok(true),
            Ok(v) if v == "cc" => Ok(false),
            Ok(v) => Err(format!(
                "RETROM3_ATTN_BWD={v:?}: expected tc (tensor cores) or cc (CUDA cores)"
            )),
        })
        .clone()
        .map_err(Error::invalid)
}

/// Fused attention backward (`cpu::attention::attention_bwd`): from q, k, v, the forward's out
/// and lse, and dout, assigns dq [B, Lq, H*D] and dk, dv [B, Lk, H*D]. Two deterministic launches
/// (dq row-major, dk/dv key-major; no atomics), no scratch memory. On CUDA cores until the
/// tensor-core backward ([`AttnImpl::TensorCores`] via [`attention_bwd_with`], bf16 at head dims
/// 32 and 64) has passed the selftest on a GPU ([`TC_BACKWARD_BY_DEFAULT`], [`tc_backward`]).
///
/// # Safety
/// See the module documentation and [`attention_fwd`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_bwd(
    l: &dyn Launcher,
    dt: KDType,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    out: DevPtr,
    lse: DevPtr,
    dout: DevPtr,
    dq: DevPtr,
    dk: DevPtr,
    dv: DevPtr,
    mask: AttnKernelMask,
    d: &AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
) -> Result<()> {
    let imp = if dt == KDType::BF16
        && matches!(d.head_dim, 32 | 64)
        && tc_aligned(&[q, k, v, dout], &[out, dq, dk, dv])
        && tc_backward()?
    {
        AttnImpl::TensorCores
    } else {
        AttnImpl::CudaCores
    };
    // SAFETY: forwarded contract.
    unsafe {
        attention_bwd_with(
            l, imp, dt, q, k, v, out, lse, dout, dq, dk, dv, mask, d, scale, drop,
        )
    }
}

/// [`attention_bwd`] with the kernels chosen by the caller (selftest and benchmarks run both):
/// tensor cores take bf16 at head dims 32 and 64 (`attention_bwd_{dq,dkdv}_tc_d{D}_bf16`).
///
/// # Safety
/// As [`attention_bwd`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_bwd_with(
    l: &dyn Launcher,
    imp: AttnImpl,
    dt: KDType,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    out: DevPtr,
    lse: DevPtr,
    dout: DevPtr,
    dq: DevPtr,
    dk: DevPtr,
    dv: DevPtr,
    mask: AttnKernelMask,
    d: &AttnDims,
    scale: f32,
    drop: Option<AttnDropout>,
) -> Result<()> {
    if d.batch == 0 || d.heads == 0 || (d.q_len == 0 && d.k_len == 0) {
        return Ok(());
    }
    let tc = imp != AttnImpl::CudaCores;
    if tc && (dt != KDType::BF16 || !matches!(d.head_dim, 32 | 64)) {
        return Err(Error::Unsupported {
            op: format!(
                "tensor-core attention backward with {} storage at head dim {} (bf16, 32 or 64)",
                dt.suffix(),
                d.head_dim
            ),
            device: "cuda/emu".into(),
        });
    }
    if tc && !tc_aligned(&[q, k, v, dout], &[out, dq, dk, dv]) {
        return Err(tc_alignment_error("backward"));
    }
    if d.q_len > 0 {
        let ptrs = [q, k, v, out, lse, dout, dq];
        let (mut cfg, mut a) = attn_launch(&ptrs, d.q_len, d, scale, mask, drop)?;
        if tc {
            // 4 warps x 16 query rows per block (kernels/attention.cu, kTcRows).
            cfg.grid[0] = blocks(d.q_len, 64, u32::MAX);
            l.launch(
                &format!("attention_bwd_dq_tc_d{}_bf16", d.head_dim),
                &cfg,
                &mut a,
            )?;
        } else {
            let op = format!("attention_bwd_dq_d{}", d.head_dim);
            l.launch(&name(&op, dt), &cfg, &mut a)?;
        }
    }
    if d.k_len > 0 {
        let ptrs = [q, k, v, out, lse, dout, dk, dv];
        let (mut cfg, mut a) = attn_launch(&ptrs, d.k_len, d, scale, mask, drop)?;
        if tc {
            // 4 warps x 16 keys per block.
            cfg.grid[0] = blocks(d.k_len, 64, u32::MAX);
            l.launch(
                &format!("attention_bwd_dkdv_tc_d{}_bf16", d.head_dim),
                &cfg,
                &mut a,
            )?;
        } else {
            let op = format!("attention_bwd_dkdv_d{}", d.head_dim);
            l.launch(&name(&op, dt), &cfg, &mut a)?;
        }
    }
    Ok(())
}

/// Largest k the top-k kernel takes (kernels/topk.cu, kTopkMax).
pub const TOPK_MAX: usize = 2048;

/// Per row of scores [rows, n] f32: the k largest (score desc, column asc) into out_scores
/// [rows, k] f32 and out_idx [rows, k] i32 (kernels/topk.cu; twin `cpu::topk::topk_rows`).
///
/// # Safety
/// See the module documentation.
pub unsafe fn topk_rows(
    l: &dyn Launcher,
    scores: DevPtr,
    out_scores: DevPtr,
    out_idx: DevPtr,
    rows: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    if rows == 0 || k == 0 {
        return Ok(());
    }
    if k > n || k > TOPK_MAX {
        return Err(Error::invalid(format!(
            "top-k with k = {k} over {n} columns (k must be <= n and <= {TOPK_MAX})"
        )));
    }
    int(rows * n, "rows * n")?;
    let cfg = LaunchConfig::linear(int(rows, "rows")? as u32, 256, 0);
    let mut a = KernelArgs::new();
    a.arg(scores)
        .arg(int(rows, "rows")?)
        .arg(int(n, "n")?)
        .arg(int(k, "k")?)
        .arg(out_scores)
        .arg(out_idx);
    l.launch("topk_rows_f32", &cfg, &mut a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask cache's tiles on an H100 / H200 (228 KiB per SM) and an A100 (164 KiB), and the
    /// launch's bytes for them: all of Lk's tiles while they fit, the first ones past that.
    #[test]
    fn mask_cache_tiles() {
        let (h100, a100) = (228 << 10, 164 << 10);
        // (228 KiB / 3 - 1 KiB - 38 KiB) / 512 B.
        assert_eq!(tc_mask_tiles(64, h100), 74);
        assert_eq!(tc_mask_tiles(32, h100), 74);
        // 2 blocks at head dim 128.
        assert_eq!(tc_mask_tiles(128, h100), 150);
        assert_eq!(tc_mask_tiles(64, a100), 31);
        // No room at all: none (every head then draws for itself).
        assert_eq!(tc_mask_tiles(64, 64 << 10), 0);
        assert_eq!(tc_fwd_shared_bytes(true, 4, 1100, 74), 18 * 512);
        assert_eq!(tc_fwd_shared_bytes(true, 4, 8192, 74), 74 * 512);
        assert_eq!(tc_fwd_shared_bytes(true, 1, 8192, 74), 0);
        assert_eq!(tc_fwd_shared_bytes(false, 4, 8192, 74), 0);
    }

    /// Heads per block: the two-stream variants are the divisors of the heads up to 4, key
    /// padding has only 1, and the default shares the draw only up to the measured lengths.
    #[test]
    fn heads_per_block_rules() {
        let ts = AttnKernelMask::TwoStream {
            key_mask: DevPtr(0),
            words: DevPtr(0),
            p: 0.5,
            seed: 1,
        };
        let dims = |l: usize| AttnDims {
            batch: 8,
            q_len: l,
            k_len: l,
            heads: 16,
            head_dim: 64,
        };
        assert_eq!(tc_heads_per_block_options(ts, &dims(8192)), [1, 2, 4]);
        let six = AttnDims {
            heads: 6,
            ..dims(512)
        };
        assert_eq!(tc_heads_per_block_options(ts, &six), [1, 2]);
        let pad = AttnKernelMask::KeyPadding {
            key_mask: DevPtr(0),
        };
        assert_eq!(tc_heads_per_block_options(pad, &dims(512)), [1]);
        // B 8 x 16 heads x 8 row blocks = 1024 blocks at S512: 4 heads per block would leave
        // 256, under the 1024 the rule keeps; at S 8192 (16k blocks) the bits exceed the
        // measured default (16 tiles, double-buffered).
        assert_eq!(tc_heads_per_block_cached(ts, &dims(512), true), 1);
        assert_eq!(tc_heads_per_block_cached(ts, &dims(8192), true), 1);
        let long = AttnDims {
            batch: 64,
            ..dims(1024)
        };
        assert_eq!(tc_heads_per_block_cached(ts, &long, true), 4);
    }
}

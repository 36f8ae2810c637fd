//! Launch wrappers of the M3 retrieval kernels: ColBERT MaxSim (kernels/maxsim.cu), the sparse
//! lexical head (kernels/sparse.cu) and the contrastive losses over score matrices
//! (kernels/infonce.cu). Same conventions as [`crate::device::kernels`]: device-agnostic, one
//! `unsafe fn` per kernel family, the launch shape the .cu file documents and the arguments in the
//! kernel's parameter order.
//!
//! Every function is `unsafe`: the caller guarantees that each pointer addresses device memory of
//! the size stated in the doc comment (elements of the kernel's dtype `dt` unless marked
//! f32/i32/u32/i64/u8).

use crate::device::launch::{DevPtr, KDType, KernelArgs, LaunchConfig, Launcher};
use crate::error::{Error, Result};

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} exceeds the kernels' i32")))
}

fn grid(n: usize, what: &str) -> Result<u32> {
    Ok(int(n.max(1), what)? as u32)
}

fn name(op: &str, dt: KDType) -> String {
    format!("{op}_{}", dt.suffix())
}

/// Sizes of a MaxSim batch: q [queries, q_len, dim], p [passages, p_len, dim]
/// (same as `cpu::maxsim::MaxSimDims`).
pub use crate::device::cpu::maxsim::MaxSimDims;

fn maxsim_check(d: &MaxSimDims) -> Result<()> {
    int(d.queries * d.q_len * d.dim, "queries * q_len * dim")?;
    int(d.passages * d.p_len * d.dim, "passages * p_len * dim")?;
    int(
        d.queries * d.passages * d.q_len,
        "queries * passages * q_len",
    )?;
    if d.queries > 65_535 {
        return Err(Error::invalid(format!(
            "maxsim: {} queries exceed the grid's y limit 65535",
            d.queries
        )));
    }
    Ok(())
}

/// MaxSim training forward. q [queries, q_len, dim], qmask [queries, q_len] u8,
/// p [passages, p_len, dim], pmask [passages, p_len] u8 -> scores [queries, passages] f32 and
/// argmax [queries, passages, q_len] i32 (-1: padding query token or no real passage token).
///
/// # Safety
/// See the module documentation.
pub unsafe fn maxsim_fwd(
    l: &dyn Launcher,
    dt: KDType,
    q: DevPtr,
    qmask: DevPtr,
    p: DevPtr,
    pmask: DevPtr,
    scores: DevPtr,
    argmax: DevPtr,
    d: MaxSimDims,
) -> Result<()> {
    if d.queries == 0 || d.passages == 0 {
        return Ok(());
    }
    maxsim_check(&d)?;
    let cfg = LaunchConfig {
        grid: [grid(d.passages, "passages")?, d.queries as u32, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
    };
    let mut a = KernelArgs::new();
    a.arg(q)
        .arg(qmask)
        .arg(p)
        .arg(pmask)
        .arg(scores)
        .arg(argmax);
    a.arg(int(d.queries, "queries")?)
        .arg(int(d.q_len, "q_len")?)
        .arg(int(d.passages, "passages")?)
        .arg(int(d.p_len, "p_len")?)
        .arg(int(d.dim, "dim")?);
    l.launch(&name("maxsim_fwd", dt), &cfg, &mut a)
}

/// MaxSim backward. q [queries, q_len, dim], qmask [queries, q_len] u8, p [passages, p_len, dim],
/// argmax [queries, passages, q_len] i32 (from [`maxsim_fwd`]), dscores [queries, passages] f32
/// -> dq [queries, q_len, dim] f32 and dp [passages, p_len, dim] f32, both accumulated (`+=`);
/// dp through float atomics (summation order not deterministic), dq deterministic.
///
/// # Safety
/// See the module documentation.
pub unsafe fn maxsim_bwd(
    l: &dyn Launcher,
    dt: KDType,
    q: DevPtr,
    qmask: DevPtr,
    p: DevPtr,
    argmax: DevPtr,
    dscores: DevPtr,
    dq: DevPtr,
    dp: DevPtr,
    d: MaxSimDims,
) -> Result<()> {
    if d.queries == 0 || d.passages == 0 || d.q_len == 0 || d.dim == 0 {
        return Ok(());
    }
    maxsim_check(&d)?;
    let cfg = LaunchConfig::linear(grid(d.queries * d.q_len, "queries * q_len")?, 128, 0);
    let mut a = KernelArgs::new();
    a.arg(q)
        .arg(qmask)
        .arg(p)
        .arg(argmax)
        .arg(dscores)
        .arg(dq)
        .arg(dp);
    a.arg(int(d.queries, "queries")?)
        .arg(int(d.q_len, "q_len")?)
        .arg(int(d.passages, "passages")?)
        .arg(int(d.p_len, "p_len")?)
        .arg(int(d.dim, "dim")?);
    l.launch(&name("maxsim_bwd", dt), &cfg, &mut a)
}

/// Which MaxSim inference-scan kernel runs ([`maxsim_docs_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxSimImpl {
    /// Tensor cores where they apply (bf16, dim a multiple of 32, aligned buffers), else SIMT.
    Auto,
    /// `maxsim_docs_{f32,bf16}`: the f32-FMA tile on CUDA cores (any storage, any dim).
    Simt,
    /// `maxsim_docs_tc_bf16`: bf16 mma.sync, one launch per 32 query tokens (an error when it
    /// does not apply).
    TensorCores,
    /// `maxsim_docs_tcp_bf16`: the same fragments with the load pipeline running across tiles
    /// and a grid of resident blocks walking the documents; needs dim % 128 == 0 (an error
    /// when it does not apply).
    TensorCoresPipelined,
}

/// Whether [`MaxSimImpl::Auto`] takes the pipelined tensor-core scan where it applies. On since
/// session 9's H200 call (`bench kernels`, same call, q8 / q32 x 20k documents of 128 x 1024):
/// 92% / 84% of copy bandwidth against the single-pass scan's 68% / 58% (docs/perf.md).
pub const MAXSIM_PIPELINED_BY_DEFAULT: bool = true;

/// Query tokens per launch of `maxsim_docs_tc_bf16`.
const MD_TC_QUERY_TILE: usize = 32;

/// Bytes between two query rows in the tensor-core kernel's shared memory (kernels/maxsim.cu
/// md_stride_words).
fn md_stride_bytes(dim: usize) -> usize {
    (2 * dim).div_ceil(128) * 128 + 64
}

/// Largest dynamic shared memory the tensor-core scan asks for (the H100/A100 opt-in limit).
const MD_TC_MAX_SMEM: usize = 227 * 1024;

/// Why the tensor-core scan does not apply (None: it does).
fn maxsim_docs_tc_unfit(dt: KDType, q: DevPtr, store: DevPtr, dim: usize) -> Option<&'static str> {
    if dt != KDType::BF16 {
        Some("needs bf16 storage")
    } else if !dim.is_multiple_of(32) {
        Some("needs dim % 32 == 0")
    } else if !store.0.is_multiple_of(16) || !q.0.is_multiple_of(4) {
        Some("needs a 16-byte aligned store and a 4-byte aligned query")
    } else if MD_TC_QUERY_TILE * md_stride_bytes(dim) > MD_TC_MAX_SMEM {
        Some("dim too large for the query tile in shared memory")
    } else {
        None
    }
}

/// MaxSim inference scan: one query q [q_len, dim] (no padding) against `docs` documents stored
/// back to back, store [offsets\[docs\], dim] with offsets [docs + 1] i64 (non-decreasing, token
/// rows) -> scores \[docs\] f32 (an empty document scores 0). bf16 runs on tensor cores when the
/// shapes allow ([`MaxSimImpl::Auto`]).
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn maxsim_docs(
    l: &dyn Launcher,
    dt: KDType,
    q: DevPtr,
    q_len: usize,
    store: DevPtr,
    offsets: DevPtr,
    scores: DevPtr,
    docs: usize,
    dim: usize,
) -> Result<()> {
    maxsim_docs_with(
        l,
        MaxSimImpl::Auto,
        dt,
        q,
        q_len,
        store,
        offsets,
        scores,
        docs,
        dim,
    )
}

/// [`maxsim_docs`] with the kernel chosen by `imp`.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn maxsim_docs_with(
    l: &dyn Launcher,
    imp: MaxSimImpl,
    dt: KDType,
    q: DevPtr,
    q_len: usize,
    store: DevPtr,
    offsets: DevPtr,
    scores: DevPtr,
    docs: usize,
    dim: usize,
) -> Result<()> {
    if docs == 0 {
        return Ok(());
    }
    int(q_len * dim, "q_len * dim")?;
    let unfit = maxsim_docs_tc_unfit(dt, q, store, dim);
    let piped_unfit = unfit.or((!dim.is_multiple_of(128)).then_some("needs dim % 128 == 0"));
    let tc = match (imp, unfit) {
        (MaxSimImpl::Simt, _) => false,
        // No query token: every document scores 0, as the SIMT kernel writes.
        (_, _) if q_len == 0 => false,
        (MaxSimImpl::Auto, u) => u.is_none(),
        (MaxSimImpl::TensorCores, None) => true,
        (MaxSimImpl::TensorCoresPipelined, _) if piped_unfit.is_none() => true,
        (MaxSimImpl::TensorCores | MaxSimImpl::TensorCoresPipelined, _) => {
            let why = piped_unfit.unwrap_or("does not apply");
            return Err(Error::invalid(format!(
                "maxsim_docs on tensor cores {why} (dtype {}, dim {dim})",
                dt.suffix()
            )));
        }
    };
    if !tc {
        let cfg = LaunchConfig::linear(grid(docs, "docs")?, 256, 0);
        let mut a = KernelArgs::new();
        a.arg(q)
            .arg(int(q_len, "q_len")?)
            .arg(store)
            .arg(offsets)
            .arg(scores);
        a.arg(int(docs, "docs")?).arg(int(dim, "dim")?);
        return l.launch(&name("maxsim_docs", dt), &cfg, &mut a);
    }
    let piped = piped_unfit.is_none()
        && (imp == MaxSimImpl::TensorCoresPipelined
            || (imp == MaxSimImpl::Auto && MAXSIM_PIPELINED_BY_DEFAULT));
    let kernel = if piped {
        "maxsim_docs_tcp_bf16"
    } else {
        "maxsim_docs_tc_bf16"
    };
    for t0 in (0..q_len).step_by(MD_TC_QUERY_TILE) {
        let qn = (q_len - t0).min(MD_TC_QUERY_TILE);
        let smem = qn.div_ceil(8) * 8 * md_stride_bytes(dim);
        // The pipelined kernel's grid: the blocks that can be resident at once (2 per SM by its
        // launch bounds, fewer where the query tile's shared memory allows fewer; 1 KB of each
        // SM's shared memory is the driver's per block), or fewer when there are few documents.
        let blocks = if piped {
            let per_sm = (l.shared_memory_per_multiprocessor() / (smem + 1024)).clamp(1, 2);
            grid(
                docs.div_ceil(8).min(per_sm * l.multiprocessors()),
                "docs / 8",
            )?
        } else {
            grid(docs.div_ceil(8), "docs / 8")?
        };
        let cfg = LaunchConfig::linear(blocks, 256, smem as u32);
        let mut a = KernelArgs::new();
        a.arg(DevPtr(q.0 + (t0 * dim * 2) as u64))
            .arg(int(qn, "query tile")?)
            .arg(int(q_len, "q_len")?)
            .arg(store)
            .arg(offsets)
            .arg(scores);
        a.arg(int(docs, "docs")?)
            .arg(int(dim, "dim")?)
            .arg(i32::from(t0 > 0));
        l.launch(kernel, &cfg, &mut a)?;
    }
    Ok(())
}

/// The compact per-text lexical lists of [`sparse_fwd`]: `texts` lists of capacity `cap` (the
/// texts' padded length). ids [texts, cap] u32 (sorted ascending, 0xFFFFFFFF past the count),
/// w [texts, cap] f32, pos [texts, cap] i32 (-1 past the count), count \[texts\] i32.
#[derive(Clone, Copy, Debug)]
pub struct LexLists {
    pub ids: DevPtr,
    pub w: DevPtr,
    pub pos: DevPtr,
    pub count: DevPtr,
    pub texts: usize,
    pub cap: usize,
}

/// Longest text [`sparse_fwd`] sorts in its 32 KB of shared memory.
pub const SPARSE_MAX_LEN: usize = 8192;

/// Sparse head forward with the per-text max by token id. h [texts * cap, hidden], ws \[hidden\],
/// bias \[1\], ids [texts * cap] u32 (all < `vocab`), drop \[ndrop\] u32 (special ids) ->
/// weights [texts * cap] f32 = ReLU(h . ws + b) and the lists `out` (texts and cap as given
/// there). Ids in `drop` and zero weights are left out.
///
/// # Safety
/// See the module documentation.
pub unsafe fn sparse_fwd(
    l: &dyn Launcher,
    dt: KDType,
    h: DevPtr,
    ws: DevPtr,
    bias: DevPtr,
    ids: DevPtr,
    drop: DevPtr,
    ndrop: usize,
    weights: DevPtr,
    out: &LexLists,
    hidden: usize,
    vocab: usize,
) -> Result<()> {
    if out.texts == 0 || out.cap == 0 {
        return Ok(());
    }
    if out.cap > SPARSE_MAX_LEN {
        return Err(Error::invalid(format!(
            "sparse_fwd: text length {} > {SPARSE_MAX_LEN}",
            out.cap
        )));
    }
    let p2 = out.cap.next_power_of_two();
    // Sort keys are (id << log2 p2) | pos, and 0xFFFFFFFF marks "no entry".
    if (vocab as u64) * (p2 as u64) >= u32::MAX as u64 {
        return Err(Error::invalid(format!(
            "sparse_fwd: vocabulary {vocab} x length {p2} does not fit the 32-bit sort keys"
        )));
    }
    int(out.texts * out.cap * hidden.max(1), "rows * hidden")?;
    let cfg = LaunchConfig::linear(grid(out.texts, "texts")?, 256, (p2 * 4) as u32);
    let mut a = KernelArgs::new();
    a.arg(h)
        .arg(ws)
        .arg(bias)
        .arg(ids)
        .arg(drop)
        .arg(int(ndrop, "ndrop")?);
    a.arg(weights)
        .arg(out.ids)
        .arg(out.w)
        .arg(out.pos)
        .arg(out.count);
    a.arg(int(out.texts, "texts")?)
        .arg(int(out.cap, "len")?)
        .arg(int(hidden, "hidden")?);
    l.launch(&name("sparse_fwd", dt), &cfg, &mut a)
}

/// Lexical score matrix scores [q.texts, p.texts] f32 = Σ over shared ids of w_q w_p, from the
/// lists of [`sparse_fwd`].
///
/// # Safety
/// See the module documentation.
pub unsafe fn sparse_scores(
    l: &dyn Launcher,
    q: &LexLists,
    p: &LexLists,
    scores: DevPtr,
) -> Result<()> {
    let pairs = q.texts * p.texts;
    if pairs == 0 {
        return Ok(());
    }
    int(pairs, "query x passage texts")?;
    let cfg = LaunchConfig::linear(grid(pairs.div_ceil(8), "pairs / 8")?, 256, 0);
    let mut a = KernelArgs::new();
    a.arg(q.ids).arg(q.w).arg(q.count);
    a.arg(int(q.texts, "query texts")?)
        .arg(int(q.cap, "query len")?);
    a.arg(p.ids).arg(p.w).arg(p.count);
    a.arg(int(p.texts, "passage texts")?)
        .arg(int(p.cap, "passage len")?);
    a.arg(scores);
    l.launch("sparse_scores_f32", &cfg, &mut a)
}

/// Backward of [`sparse_scores`]: dscores [q.texts, p.texts] f32 -> dwq [q.texts, q.cap] f32
/// and dwp [p.texts, p.cap] f32 (assigned): the gradient of each position's term weight, non-zero
/// only at the argmax positions of the lists. Deterministic.
///
/// # Safety
/// See the module documentation.
pub unsafe fn sparse_scores_bwd(
    l: &dyn Launcher,
    q: &LexLists,
    p: &LexLists,
    dscores: DevPtr,
    dwq: DevPtr,
    dwp: DevPtr,
) -> Result<()> {
    if q.texts + p.texts == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig::linear(grid(q.texts + p.texts, "texts")?, 128, 0);
    let mut a = KernelArgs::new();
    a.arg(q.ids).arg(q.w).arg(q.pos).arg(q.count);
    a.arg(int(q.texts, "query texts")?)
        .arg(int(q.cap, "query len")?);
    a.arg(p.ids).arg(p.w).arg(p.pos).arg(p.count);
    a.arg(int(p.texts, "passage texts")?)
        .arg(int(p.cap, "passage len")?);
    a.arg(dscores).arg(dwq).arg(dwp);
    l.launch("sparse_scores_bwd_f32", &cfg, &mut a)
}

/// Sparse head backward. h [rows, hidden], ws \[hidden\], weights \[rows\] f32 (the forward's, for
/// the ReLU gate), dw \[rows\] f32 -> dh [rows, hidden] (assigned), dws \[hidden\] f32 and db \[1\]
/// f32 (accumulated).
///
/// # Safety
/// See the module documentation.
pub unsafe fn sparse_weights_bwd(
    l: &dyn Launcher,
    dt: KDType,
    h: DevPtr,
    ws: DevPtr,
    weights: DevPtr,
    dw: DevPtr,
    dh: DevPtr,
    dws: DevPtr,
    db: DevPtr,
    rows: usize,
    hidden: usize,
) -> Result<()> {
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    int(rows * hidden, "rows * hidden")?;
    let smem = int(hidden * 4, "sparse_weights_bwd shared bytes")? as u32;
    let blocks = rows.div_ceil(8).min(1024);
    let cfg = LaunchConfig::linear(blocks as u32, 256, smem);
    let mut a = KernelArgs::new();
    a.arg(h)
        .arg(ws)
        .arg(weights)
        .arg(dw)
        .arg(dh)
        .arg(dws)
        .arg(db);
    a.arg(int(rows, "rows")?).arg(int(hidden, "hidden")?);
    l.launch(&name("sparse_weights_bwd", dt), &cfg, &mut a)
}

/// InfoNCE (hard-target cross-entropy) over x = scores * inv_t + mask, fused forward and
/// backward. scores [rows, cols], mask [rows, cols] f32 or NULL, targets \[rows\] i64 (-100 =
/// ignored) -> lse \[rows\] f32, row_loss \[rows\] f32 and, unless NULL, dscores [rows, cols] =
/// g (softmax(x) - onehot) inv_t (may alias scores). For a mean over C counted rows pass
/// g = upstream / C.
///
/// # Safety
/// See the module documentation.
pub unsafe fn infonce(
    l: &dyn Launcher,
    dt: KDType,
    scores: DevPtr,
    mask: DevPtr,
    targets: DevPtr,
    inv_t: f32,
    g: f32,
    lse: DevPtr,
    row_loss: DevPtr,
    dscores: DevPtr,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    int(rows * cols, "rows * cols")?;
    let cfg = LaunchConfig::linear(grid(rows, "rows")?, 256, 0);
    let mut a = KernelArgs::new();
    a.arg(scores).arg(mask).arg(targets).arg(inv_t).arg(g);
    a.arg(lse).arg(row_loss).arg(dscores);
    a.arg(int(rows, "rows")?).arg(int(cols, "cols")?);
    l.launch(&name("infonce", dt), &cfg, &mut a)
}

/// Soft-target cross-entropy (KL to a teacher up to its entropy; self-distillation) over
/// x = scores * inv_t. scores [rows, cols], targets [rows, cols] f32 probabilities -> lse \[rows\]
/// f32, row_loss \[rows\] f32 = -Σ t log softmax(x) and, unless NULL, dscores [rows, cols] =
/// g (softmax(x) Σt - t) inv_t (may alias scores). For the mean over rows pass g = upstream / rows.
///
/// # Safety
/// See the module documentation.
pub unsafe fn soft_ce(
    l: &dyn Launcher,
    dt: KDType,
    scores: DevPtr,
    targets: DevPtr,
    inv_t: f32,
    g: f32,
    lse: DevPtr,
    row_loss: DevPtr,
    dscores: DevPtr,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    int(rows * cols, "rows * cols")?;
    let cfg = LaunchConfig::linear(grid(rows, "rows")?, 256, 0);
    let mut a = KernelArgs::new();
    a.arg(scores).arg(targets).arg(inv_t).arg(g);
    a.arg(lse).arg(row_loss).arg(dscores);
    a.arg(int(rows, "rows")?).arg(int(cols, "cols")?);
    l.launch(&name("soft_ce", dt), &cfg, &mut a)
}

/// Largest group [`m3_kd`] handles.
pub const KD_MAX_GROUP: usize = 128;

/// FlagEmbedding's m3_kd_loss over x = scores * inv_t. scores [rows, cols], teacher [rows, group]
/// f32; row b's group is columns b·col_stride .. b·col_stride + group (col_stride = group for
/// in-batch matrices, 0 for local [rows, group] blocks) -> lse [rows, group] f32, row_loss \[rows\]
/// f32 = Σ_g T\[b,g\] CE(x_b without group columns < g, target g) (the loss is their mean) and,
/// unless NULL, dscores [rows, cols] (may alias scores); for the mean pass g = upstream / rows.
///
/// # Safety
/// See the module documentation.
pub unsafe fn m3_kd(
    l: &dyn Launcher,
    dt: KDType,
    scores: DevPtr,
    teacher: DevPtr,
    inv_t: f32,
    g: f32,
    col_stride: usize,
    lse: DevPtr,
    row_loss: DevPtr,
    dscores: DevPtr,
    rows: usize,
    cols: usize,
    group: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    if group == 0 || group > KD_MAX_GROUP || (rows - 1) * col_stride + group > cols {
        return Err(Error::invalid(format!(
            "m3_kd: group {group} (<= {KD_MAX_GROUP}) with column stride {col_stride} does not \
             fit {rows} rows of {cols} columns"
        )));
    }
    int(rows * cols, "rows * cols")?;
    let cfg = LaunchConfig::linear(grid(rows, "rows")?, 256, 0);
    let mut a = KernelArgs::new();
    a.arg(scores).arg(teacher).arg(inv_t).arg(g);
    a.arg(int(col_stride, "col_stride")?);
    a.arg(lse).arg(row_loss).arg(dscores);
    a.arg(int(rows, "rows")?)
        .arg(int(cols, "cols")?)
        .arg(int(group, "group")?);
    l.launch(&name("m3_kd", dt), &cfg, &mut a)
}

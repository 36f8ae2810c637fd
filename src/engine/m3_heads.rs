//! The three BGE-M3 heads in training on a kernel device (issue 5): the encoder's last hidden
//! state stays on the device; only the \[CLS\] rows ([B, H]) and the two score matrices
//! ([Bq, Bp] each, sparse and ColBERT) come to the host, where the losses run on a small tape;
//! their gradients go back up and the heads' backward produces the hidden state's gradient on the
//! device, ready for [`DeviceEncoder::backward`](super::DeviceEncoder::backward). With
//! sub-batches, each piece's head outputs are placed in its side's buffers (pass 1) and each
//! piece's hidden-state gradient is taken from them (pass 2, after its forward is recomputed).
//!
//! Same function as `model::m3_train::apply_heads` + `scores_from_heads` (checked against it in
//! tests/device_engine.rs):
//! - dense: the \[CLS\] row (normalised on the host tape);
//! - sparse: w = ReLU(H ws + b) per token, max per token id without the special ids
//!   (`sparse_fwd`), Σ over shared ids of w_q w_p (`sparse_scores`); backward `sparse_scores_bwd`
//!   then `sparse_weights_bwd` (the gradient reaches only each id's argmax position);
//! - ColBERT: v = normalise(H Wᵀ + b) for every position, MaxSim over positions 1.. of the real
//!   tokens (position 0 is masked out, so the \[CLS\] vector never enters); backward `maxsim_bwd`
//!   (f32), a cast to the compute type, `l2_normalize_bwd`, then two GEMMs and a column sum.

use super::{upload_pod, DBuf};
use crate::device::cpu::gemm::Trans;
use crate::device::kernels as k;
use crate::device::kernels_m3::{self as km, LexLists, MaxSimDims};
use crate::device::launch::{DevBuf, DevPtr, DeviceGemm, KDType, KernelDevice};
use crate::error::{Error, Result};
use crate::model::encoder::EncoderInput;
use crate::model::m3::NORM_EPS;
use crate::tensor::Tensor;

/// The sparse and ColBERT head weights on the device (uploaded from the host's values each step:
/// the heads' optimizer runs on the host) and the special ids the sparse head leaves out.
pub struct HeadWeights {
    colbert_w: DBuf,
    colbert_b: DBuf,
    sparse_w: DBuf,
    sparse_b: DBuf,
    drop: DevBuf,
    ndrop: usize,
    /// ColBERT output width.
    pub colbert_dim: usize,
    pub hidden: usize,
    dt: KDType,
}

impl HeadWeights {
    /// `heads`: colbert weight [Dc, H], colbert bias \[Dc\], sparse weight [1, H], sparse bias \[1\]
    /// (`model::m3_train::HEAD_NAMES` order), stored as `dt`.
    pub fn upload(
        dev: &dyn KernelDevice,
        heads: &[Tensor],
        dt: KDType,
        drop_ids: &[u32],
    ) -> Result<HeadWeights> {
        let [cw, cb, sw, sb] = heads else {
            return Err(Error::invalid(format!(
                "device heads: {} head tensors, expected 4",
                heads.len()
            )));
        };
        let dims = cw.dims();
        if dims.len() != 2 || cb.numel() != dims[0] || sw.numel() != dims[1] || sb.numel() != 1 {
            return Err(Error::invalid(format!(
                "device heads: shapes {:?} {:?} {:?} {:?} do not form colbert [Dc, H] + [Dc] and \
                 sparse [1, H] + [1]",
                cw.dims(),
                cb.dims(),
                sw.dims(),
                sb.dims()
            )));
        }
        let up = |t: &Tensor| DBuf::from_f32(dev, t.to_f32().f32s()?, dt);
        // A zero-length upload may not be allowed: keep one unused id.
        let drop: Vec<u32> = if drop_ids.is_empty() {
            vec![u32::MAX]
        } else {
            drop_ids.to_vec()
        };
        Ok(HeadWeights {
            colbert_w: up(cw)?,
            colbert_b: up(cb)?,
            sparse_w: up(sw)?,
            sparse_b: up(sb)?,
            drop: upload_pod(dev, &drop)?,
            ndrop: drop_ids.len(),
            colbert_dim: dims[0],
            hidden: dims[1],
            dt,
        })
    }
}

/// One side's lexical lists (`sparse_fwd`'s output) in device buffers.
pub(crate) struct LexBufs {
    pub(crate) ids: DevBuf,
    pub(crate) w: DevBuf,
    pub(crate) pos: DevBuf,
    pub(crate) count: DevBuf,
    pub(crate) texts: usize,
    pub(crate) cap: usize,
}

impl LexBufs {
    fn new(dev: &dyn KernelDevice, texts: usize, cap: usize) -> Result<LexBufs> {
        Ok(LexBufs {
            ids: dev.alloc(texts * cap * 4)?,
            w: dev.alloc(texts * cap * 4)?,
            pos: dev.alloc(texts * cap * 4)?,
            count: dev.alloc(texts.max(1) * 4)?,
            texts,
            cap,
        })
    }

    pub(crate) fn lists(&self) -> LexLists {
        LexLists {
            ids: self.ids.ptr,
            w: self.w.ptr,
            pos: self.pos.ptr,
            count: self.count.ptr,
            texts: self.texts,
            cap: self.cap,
        }
    }
}

/// Rows `rows` of `h` [total, width] (storage type kept) as a new [rows.len(), width] buffer.
pub(crate) fn gather_rows(
    dev: &dyn KernelDevice,
    h: &DBuf,
    rows: &[u32],
    width: usize,
) -> Result<DBuf> {
    let ids = upload_pod(dev, rows)?;
    let out = DBuf::uninit(dev, rows.len() * width, h.dtype())?;
    // SAFETY: h holds len / width rows of `width` (the table), ids row numbers below that (the
    // kernel gives zeros for larger ones), out rows.len() × width.
    unsafe {
        k::gather_fwd(
            dev,
            h.dtype(),
            h.ptr(),
            ids.ptr,
            out.ptr(),
            rows.len(),
            width,
            h.len() / width.max(1),
        )?
    };
    Ok(out)
}

/// The [CLS] (first) row of every text: [batch, hidden] f32 on the host.
fn cls_rows(dev: &dyn KernelDevice, h: &DBuf, x: &EncoderInput, hidden: usize) -> Result<Vec<f32>> {
    let rows: Vec<u32> = (0..x.batch).map(|i| (i * x.len) as u32).collect();
    gather_rows(dev, h, &rows, hidden)?.to_f32(dev)
}

/// ColBERT projection of every row: pre = h Wᵀ + b and its normalised rows, both [n, dc] in
/// `dt` (h [n, hd], W [dc, hd], b [dc]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn colbert_project(
    dev: &dyn KernelDevice,
    dt: KDType,
    h: &DBuf,
    w: &DBuf,
    b: &DBuf,
    n: usize,
    hd: usize,
    dc: usize,
) -> Result<(DBuf, DBuf)> {
    let pre = DBuf::uninit(dev, n * dc, dt)?;
    let vecs = DBuf::uninit(dev, n * dc, dt)?;
    let g = DeviceGemm {
        ta: Trans::N,
        tb: Trans::T,
        m: n,
        k: hd,
        n: dc,
        alpha: 1.0,
        beta: 0.0,
        ab: dt,
        c: dt,
    };
    // SAFETY: h [n, hd], W [dc, hd], pre and vecs [n, dc], bias [dc].
    unsafe {
        dev.gemm(&g, h.ptr(), w.ptr(), pre.ptr())?;
        k::add_bias(dev, dt, pre.ptr(), b.ptr(), n, dc)?;
        k::l2_normalize_fwd(dev, dt, pre.ptr(), vecs.ptr(), n, dc, NORM_EPS)?;
    }
    Ok((pre, vecs))
}

fn check_hidden(h: &DBuf, x: &EncoderInput, hidden: usize, what: &str) -> Result<()> {
    if h.len() != x.batch * x.len * hidden || x.ids.len() != x.batch * x.len {
        return Err(Error::shape(
            what,
            &[x.batch, x.len, hidden],
            &[h.len() / hidden.max(1)],
        ));
    }
    Ok(())
}

/// Copy `texts` rows groups between a piece's layout ([texts, lp] rows of `row_bytes`) and the
/// whole side's ([batch, l] rows, the piece's texts starting at text `first`): `to_side` true
/// copies piece -> side, false side -> piece. One copy when the lengths agree, else one per text.
#[allow(clippy::too_many_arguments)]
fn move_rows(
    dev: &dyn KernelDevice,
    piece: DevPtr,
    side: DevPtr,
    texts: usize,
    lp: usize,
    l: usize,
    first: usize,
    row_bytes: usize,
    to_side: bool,
) -> Result<()> {
    let side0 = side.0 + (first * l * row_bytes) as u64;
    let copy = |p: u64, s: u64, bytes: usize| {
        let (src, dst) = if to_side { (p, s) } else { (s, p) };
        // SAFETY: the caller's buffers hold texts × lp rows (piece) and batch × l rows (side) of
        // row_bytes, with first + texts <= batch and lp <= l.
        unsafe { dev.copy_d2d(DevPtr(src), DevPtr(dst), bytes) }
    };
    if lp == l {
        return copy(piece.0, side0, texts * l * row_bytes);
    }
    for t in 0..texts {
        copy(
            piece.0 + (t * lp * row_bytes) as u64,
            side0 + (t * l * row_bytes) as u64,
            lp * row_bytes,
        )?;
    }
    Ok(())
}

/// What the backward needs of one side's sparse and ColBERT heads, for the whole side.
struct SideUnified {
    /// [n] f32: ReLU(H ws + b) (the ReLU gate of the backward); 0 past each text's piece length.
    weights: DBuf,
    lex: LexBufs,
    /// [n, Dc] in the compute type: H Wᵀ + b, and its normalised rows.
    pre: DBuf,
    vecs: DBuf,
    /// [n] u8: the real tokens after position 0 (MaxSim's masks).
    mask: DevBuf,
}

/// One side (queries or passages) of a batch: what the heads produced for every text, in the
/// side's layout ([batch, len] rows, `len` its padded length), filled piece by piece
/// ([`SideHeads::forward_piece`]; a piece may be padded to a shorter length of its own).
pub struct SideHeads {
    batch: usize,
    len: usize,
    hidden: usize,
    /// [batch, hidden] f32: the \[CLS\] rows of the hidden states.
    pub cls: Vec<f32>,
    unified: Option<SideUnified>,
}

impl SideHeads {
    /// Empty outputs for the texts of `x` (`hw` None: dense only).
    pub fn new(
        dev: &dyn KernelDevice,
        hw: Option<&HeadWeights>,
        x: &EncoderInput,
        hidden: usize,
    ) -> Result<SideHeads> {
        let n = x.batch * x.len;
        let unified = match hw {
            None => None,
            Some(hw) => {
                if hw.hidden != hidden {
                    return Err(Error::shape(
                        "device heads: sparse / ColBERT input width",
                        &[hidden],
                        &[hw.hidden],
                    ));
                }
                let dc = hw.colbert_dim;
                let lex = LexBufs {
                    ids: upload_pod(dev, &vec![u32::MAX; n.max(1)])?,
                    w: dev.alloc_zeroed(n.max(1) * 4)?,
                    pos: upload_pod(dev, &vec![-1i32; n.max(1)])?,
                    count: dev.alloc_zeroed(x.batch.max(1) * 4)?,
                    texts: x.batch,
                    cap: x.len,
                };
                let mask: Vec<u8> = (0..n)
                    .map(|i| u8::from(i % x.len != 0 && x.mask[i] != 0))
                    .collect();
                Some(SideUnified {
                    weights: DBuf::zeros(dev, n, KDType::F32)?,
                    lex,
                    pre: DBuf::zeros(dev, n * dc, hw.dt)?,
                    vecs: DBuf::zeros(dev, n * dc, hw.dt)?,
                    mask: upload_pod(dev, &mask)?,
                })
            }
        };
        Ok(SideHeads {
            batch: x.batch,
            len: x.len,
            hidden,
            cls: vec![0.0; x.batch * hidden],
            unified,
        })
    }

    /// The heads on one piece: `h` [xp.batch, xp.len, hidden] is the hidden state of `xp`, the
    /// side's texts `first .. first + xp.batch` padded to `xp.len` (<= the side's length).
    pub fn forward_piece(
        &mut self,
        dev: &dyn KernelDevice,
        hw: Option<&HeadWeights>,
        vocab: usize,
        h: &DBuf,
        xp: &EncoderInput,
        first: usize,
    ) -> Result<()> {
        self.check_piece(h, xp, first)?;
        let (m, lp, hd) = (xp.batch * xp.len, xp.len, self.hidden);
        let cls = cls_rows(dev, h, xp, hd)?;
        self.cls[first * hd..][..xp.batch * hd].copy_from_slice(&cls);
        let (Some(hw), Some(u)) = (hw, self.unified.as_ref()) else {
            return Ok(());
        };
        let (dc, dt) = (hw.colbert_dim, hw.dt);
        // Sparse: term weights and the per-text lists of the piece, then into the side's.
        let ids = upload_pod(dev, &xp.ids)?;
        let weights = DBuf::uninit(dev, m, KDType::F32)?;
        let lex = LexBufs::new(dev, xp.batch, lp)?;
        // SAFETY: h [m, hd], ws [hd], bias [1], ids [m] < vocab, drop [ndrop], weights [m], lists
        // of xp.batch × lp.
        unsafe {
            km::sparse_fwd(
                dev,
                dt,
                h.ptr(),
                hw.sparse_w.ptr(),
                hw.sparse_b.ptr(),
                ids.ptr,
                hw.drop.ptr,
                hw.ndrop,
                weights.ptr(),
                &lex.lists(),
                hd,
                vocab,
            )?
        };
        // ColBERT: every position projected and normalised; MaxSim masks position 0 and padding.
        let (pre, vecs) = colbert_project(dev, dt, h, &hw.colbert_w, &hw.colbert_b, m, hd, dc)?;
        let (b, l) = (xp.batch, self.len);
        let rows = |piece: DevPtr, side: DevPtr, row_bytes: usize| {
            move_rows(dev, piece, side, b, lp, l, first, row_bytes, true)
        };
        rows(weights.ptr(), u.weights.ptr(), 4)?;
        rows(lex.ids.ptr, u.lex.ids.ptr, 4)?;
        rows(lex.w.ptr, u.lex.w.ptr, 4)?;
        rows(lex.pos.ptr, u.lex.pos.ptr, 4)?;
        rows(pre.ptr(), u.pre.ptr(), dc * dt.size())?;
        rows(vecs.ptr(), u.vecs.ptr(), dc * dt.size())?;
        move_rows(dev, lex.count.ptr, u.lex.count.ptr, b, 1, 1, first, 4, true)
    }

    fn check_piece(&self, h: &DBuf, xp: &EncoderInput, first: usize) -> Result<()> {
        check_hidden(h, xp, self.hidden, "device heads: hidden state of a piece")?;
        if first + xp.batch > self.batch || xp.len > self.len {
            return Err(Error::invalid(format!(
                "device heads: piece of {} texts x {} tokens at text {first} does not fit a side \
                 of {} x {}",
                xp.batch, xp.len, self.batch, self.len
            )));
        }
        Ok(())
    }

    /// The gradient of a piece's hidden state (its compute type, [xp.batch, xp.len, hidden])
    /// from the gradients of the side's \[CLS\] rows `dcls` [batch, hidden] and of its sparse /
    /// ColBERT outputs (`grads`, from [`BatchScores::backward`]), accumulating the head weights'
    /// gradients into `acc`. `h` is the piece's hidden state (recomputed or kept).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_piece(
        &self,
        dev: &dyn KernelDevice,
        hw: Option<&HeadWeights>,
        grads: Option<&SideGrads>,
        acc: Option<&HeadGradBufs>,
        h: &DBuf,
        xp: &EncoderInput,
        first: usize,
        dcls: &[f32],
    ) -> Result<DBuf> {
        self.check_piece(h, xp, first)?;
        let (m, lp, hd) = (xp.batch * xp.len, xp.len, self.hidden);
        let dt = h.dtype();
        let dh = DBuf::zeros(dev, m * hd, dt)?;
        if let (Some(hw), Some(u), Some(g), Some(acc)) = (hw, self.unified.as_ref(), grads, acc) {
            let dc = hw.colbert_dim;
            let (b, l) = (xp.batch, self.len);
            let take = |side: DevPtr, len: usize, dt: KDType, row_bytes: usize| -> Result<DBuf> {
                let piece = DBuf::uninit(dev, len, dt)?;
                move_rows(dev, piece.ptr(), side, b, lp, l, first, row_bytes, false)?;
                Ok(piece)
            };
            let weights = take(u.weights.ptr(), m, KDType::F32, 4)?;
            let dw = take(g.dw.ptr(), m, KDType::F32, 4)?;
            let pre = take(u.pre.ptr(), m * dc, dt, dc * dt.size())?;
            let dv = take(g.dv.ptr(), m * dc, KDType::F32, dc * 4)?;
            // Sparse: term weights -> hidden (assigned: first), ws and b.
            // SAFETY: h and dh [m, hd], ws [hd], weights and dw [m] f32, dws [hd] f32, db [1].
            unsafe {
                km::sparse_weights_bwd(
                    dev,
                    dt,
                    h.ptr(),
                    hw.sparse_w.ptr(),
                    weights.ptr(),
                    dw.ptr(),
                    dh.ptr(),
                    acc.dws.ptr(),
                    acc.dsb.ptr(),
                    m,
                    hd,
                )?
            };
            // ColBERT: MaxSim's f32 gradient -> compute type -> normalisation -> projection.
            let dvt = if dt == KDType::F32 {
                dv
            } else {
                let t = DBuf::uninit(dev, m * dc, dt)?;
                // SAFETY: dv [m, dc] f32, t [m, dc] bf16.
                unsafe { k::cast_from_f32(dev, dt, dv.ptr(), t.ptr(), m * dc)? };
                t
            };
            let dpre = DBuf::uninit(dev, m * dc, dt)?;
            let dh_gemm = DeviceGemm {
                ta: Trans::N,
                tb: Trans::N,
                m,
                k: dc,
                n: hd,
                alpha: 1.0,
                beta: 1.0,
                ab: dt,
                c: dt,
            };
            let dw_gemm = DeviceGemm {
                ta: Trans::T,
                tb: Trans::N,
                m: dc,
                k: m,
                n: hd,
                alpha: 1.0,
                beta: 1.0,
                ab: dt,
                c: KDType::F32,
            };
            // SAFETY: pre, dvt, dpre [m, dc]; W [dc, hd]; h, dh [m, hd]; dcw [dc, hd] f32, dcb
            // [dc] f32.
            unsafe {
                k::l2_normalize_bwd(dev, dt, pre.ptr(), dvt.ptr(), dpre.ptr(), m, dc, NORM_EPS)?;
                dev.gemm(&dh_gemm, dpre.ptr(), hw.colbert_w.ptr(), dh.ptr())?;
                dev.gemm(&dw_gemm, dpre.ptr(), h.ptr(), acc.dcw.ptr())?;
                k::colsum(dev, dt, dpre.ptr(), acc.dcb.ptr(), m, dc)?;
            }
        }
        // Dense: the [CLS] rows' gradients added to what the other heads left there.
        if dcls.len() != self.batch * hd {
            return Err(Error::shape(
                "device heads: [CLS] gradient",
                &[self.batch, hd],
                &[dcls.len()],
            ));
        }
        add_cls_rows(
            dev,
            &dh,
            &dcls[first * hd..][..xp.batch * hd],
            xp.batch,
            lp,
            hd,
        )?;
        Ok(dh)
    }
}

/// The sparse and ColBERT score matrices of a batch ([Bq, Bp] f32 on the host, before the
/// temperature) and MaxSim's argmax (kept for the backward).
pub struct BatchScores {
    pub sparse: Vec<f32>,
    pub colbert: Vec<f32>,
    argmax: DevBuf,
}

/// The gradients of one side's term weights (\[n\] f32) and ColBERT vectors ([n, Dc] f32).
pub struct SideGrads {
    dw: DBuf,
    dv: DBuf,
}

/// The unified outputs of both sides and the MaxSim shape between them.
fn unified_pair<'a>(
    q: &'a SideHeads,
    p: &'a SideHeads,
    dc: usize,
) -> Result<(&'a SideUnified, &'a SideUnified, MaxSimDims)> {
    let (Some(uq), Some(up)) = (q.unified.as_ref(), p.unified.as_ref()) else {
        return Err(Error::invalid(
            "device heads: sparse / ColBERT scores need sides built with head weights",
        ));
    };
    let dims = MaxSimDims {
        queries: q.batch,
        q_len: q.len,
        passages: p.batch,
        p_len: p.len,
        dim: dc,
    };
    Ok((uq, up, dims))
}

impl BatchScores {
    /// Lexical and MaxSim scores between every query and passage of the two sides.
    pub fn new(
        dev: &dyn KernelDevice,
        hw: &HeadWeights,
        q: &SideHeads,
        p: &SideHeads,
    ) -> Result<BatchScores> {
        let (uq, up, dims) = unified_pair(q, p, hw.colbert_dim)?;
        let (bq, bp) = (q.batch, p.batch);
        let ss = DBuf::uninit(dev, bq * bp, KDType::F32)?;
        let sc = DBuf::uninit(dev, bq * bp, KDType::F32)?;
        let argmax = dev.alloc(bq * bp * q.len * 4)?;
        // SAFETY: lists of the two sides; scores [bq, bp] f32; vecs and masks as `dims`,
        // argmax [bq, bp, lq] i32.
        unsafe {
            km::sparse_scores(dev, &uq.lex.lists(), &up.lex.lists(), ss.ptr())?;
            km::maxsim_fwd(
                dev,
                hw.dt,
                uq.vecs.ptr(),
                uq.mask.ptr,
                up.vecs.ptr(),
                up.mask.ptr,
                sc.ptr(),
                argmax.ptr,
                dims,
            )?;
        }
        Ok(BatchScores {
            sparse: ss.to_f32(dev)?,
            colbert: sc.to_f32(dev)?,
            argmax,
        })
    }

    /// From the gradients of the two score matrices ([Bq, Bp] f32; None: zero) to those of
    /// each side's term weights and ColBERT vectors (whole sides; [`SideHeads::backward_piece`]
    /// takes them on to the hidden states).
    pub fn backward(
        &self,
        dev: &dyn KernelDevice,
        hw: &HeadWeights,
        (q, p): (&SideHeads, &SideHeads),
        dsparse: Option<&[f32]>,
        dcolbert: Option<&[f32]>,
    ) -> Result<(SideGrads, SideGrads)> {
        let (uq, up, dims) = unified_pair(q, p, hw.colbert_dim)?;
        let (bq, bp, dc) = (q.batch, p.batch, hw.colbert_dim);
        let (nq, np) = (bq * q.len, bp * p.len);
        let zeros = vec![0.0f32; bq * bp];
        let ds = DBuf::from_f32(dev, dsparse.unwrap_or(&zeros), KDType::F32)?;
        let dsc = DBuf::from_f32(dev, dcolbert.unwrap_or(&zeros), KDType::F32)?;
        let gq = SideGrads {
            dw: DBuf::uninit(dev, nq, KDType::F32)?,
            dv: DBuf::zeros(dev, nq * dc, KDType::F32)?,
        };
        let gp = SideGrads {
            dw: DBuf::uninit(dev, np, KDType::F32)?,
            dv: DBuf::zeros(dev, np * dc, KDType::F32)?,
        };
        // SAFETY: lists and vecs of the two sides as in the forward; dw [n] f32 (assigned), dv
        // [n, dc] f32 (accumulated into zeros).
        unsafe {
            km::sparse_scores_bwd(
                dev,
                &uq.lex.lists(),
                &up.lex.lists(),
                ds.ptr(),
                gq.dw.ptr(),
                gp.dw.ptr(),
            )?;
            km::maxsim_bwd(
                dev,
                hw.dt,
                uq.vecs.ptr(),
                uq.mask.ptr,
                up.vecs.ptr(),
                self.argmax.ptr,
                dsc.ptr(),
                gq.dv.ptr(),
                gp.dv.ptr(),
                dims,
            )?;
        }
        Ok((gq, gp))
    }
}

/// The head weights' gradients, accumulated on the device over the pieces of a batch.
pub struct HeadGradBufs {
    dws: DBuf,
    dsb: DBuf,
    dcw: DBuf,
    dcb: DBuf,
}

/// Gradients of the head weights (f32, `HEAD_NAMES` order and shapes).
pub struct HeadGrads {
    pub colbert_w: Vec<f32>,
    pub colbert_b: Vec<f32>,
    pub sparse_w: Vec<f32>,
    pub sparse_b: Vec<f32>,
}

impl HeadGradBufs {
    /// Zeros for the heads of `hw`.
    pub fn new(dev: &dyn KernelDevice, hw: &HeadWeights) -> Result<HeadGradBufs> {
        let (hd, dc) = (hw.hidden, hw.colbert_dim);
        Ok(HeadGradBufs {
            dws: DBuf::zeros(dev, hd, KDType::F32)?,
            dsb: DBuf::zeros(dev, 1, KDType::F32)?,
            dcw: DBuf::zeros(dev, dc * hd, KDType::F32)?,
            dcb: DBuf::zeros(dev, dc, KDType::F32)?,
        })
    }

    /// The sums on the host.
    pub fn download(&self, dev: &dyn KernelDevice) -> Result<HeadGrads> {
        Ok(HeadGrads {
            colbert_w: self.dcw.to_f32(dev)?,
            colbert_b: self.dcb.to_f32(dev)?,
            sparse_w: self.dws.to_f32(dev)?,
            sparse_b: self.dsb.to_f32(dev)?,
        })
    }
}

/// dh[b, 0, :] += dcls[b, :] for every text b: one upload of dcls in dh's type, then one
/// `add_bias` launch per row (no read-back, no host synchronisation).
fn add_cls_rows(
    dev: &dyn KernelDevice,
    dh: &DBuf,
    dcls: &[f32],
    batch: usize,
    len: usize,
    hidden: usize,
) -> Result<()> {
    if dcls.len() != batch * hidden || dh.len() < batch * len * hidden {
        return Err(Error::shape(
            "device heads: [CLS] gradient",
            &[batch, hidden],
            &[dcls.len()],
        ));
    }
    let g = DBuf::from_f32(dev, dcls, dh.dtype())?;
    for b in 0..batch {
        // SAFETY: row b · len of dh and row b of g hold `hidden` elements of dh's type.
        unsafe {
            k::add_bias(
                dev,
                dh.dtype(),
                dh.at(b * len * hidden),
                g.at(b * hidden),
                1,
                hidden,
            )?
        };
    }
    Ok(())
}

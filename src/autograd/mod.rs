//! A thin tape of coarse nodes (one node = one fused op), replayed in reverse by `backward`.
//!
//! A [`Var`] is a tensor plus, when it takes part in differentiation, the id of the node that made
//! it. Ops record a node only when the tape is recording and at least one input is tracked; in
//! no-grad mode nothing is kept and activations drop as soon as they go out of scope. Gradients of
//! one backward pass accumulate (`+=`) into [`Grads`]; an op that cannot differentiate returns
//! [`Error::NoBackward`] when asked to record, never a silently detached result.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// The identity of a tracked value on a tape.
pub type VarId = usize;

/// A value flowing through the graph.
#[derive(Clone, Debug)]
pub struct Var {
    value: Tensor,
    id: Option<VarId>,
}

impl Var {
    /// A constant: never receives a gradient.
    pub fn constant(value: Tensor) -> Var {
        Var { value, id: None }
    }

    /// The tensor.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// The dims of the tensor.
    pub fn dims(&self) -> &[usize] {
        self.value.dims()
    }

    /// The tape id when tracked.
    pub fn id(&self) -> Option<VarId> {
        self.id
    }

    /// Whether gradients flow to this value.
    pub fn is_tracked(&self) -> bool {
        self.id.is_some()
    }
}

/// The backward of one node: upstream gradient of the output -> gradients of its inputs (in the
/// order the inputs were recorded; `None` for an input that gets no gradient).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    name: &'static str,
    inputs: Vec<Option<VarId>>,
    output: VarId,
    backward: BackwardFn,
}

/// The tape.
pub struct Tape {
    nodes: Vec<Node>,
    next_id: VarId,
    recording: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    /// A recording tape.
    pub fn new() -> Tape {
        Tape {
            nodes: Vec::new(),
            next_id: 0,
            recording: true,
        }
    }

    /// A tape that records nothing (inference).
    pub fn no_grad() -> Tape {
        Tape {
            recording: false,
            ..Tape::new()
        }
    }

    /// Whether ops are recorded.
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A leaf that receives a gradient (a parameter or an input we differentiate by). In no-grad
    /// mode it is a constant.
    pub fn leaf(&mut self, value: Tensor) -> Var {
        if !self.recording {
            return Var::constant(value);
        }
        let id = self.fresh();
        Var {
            value,
            id: Some(id),
        }
    }

    fn fresh(&mut self) -> VarId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Record `output = op(inputs)`. `backward` is kept only when the tape records and an input is
    /// tracked; otherwise the output is a constant.
    pub fn record(
        &mut self,
        name: &'static str,
        inputs: &[&Var],
        output: Tensor,
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        if !self.recording || inputs.iter().all(|v| v.id.is_none()) {
            return Var::constant(output);
        }
        let id = self.fresh();
        self.nodes.push(Node {
            name,
            inputs: inputs.iter().map(|v| v.id).collect(),
            output: id,
            backward: Box::new(backward),
        });
        Var {
            value: output,
            id: Some(id),
        }
    }

    /// For ops without a backward: fine on constants, `NoBackward` if gradients would be needed.
    pub fn require_no_grad(&self, name: &'static str, inputs: &[&Var]) -> Result<()> {
        if self.recording && inputs.iter().any(|v| v.id.is_some()) {
            return Err(Error::NoBackward(name));
        }
        Ok(())
    }

    /// Backpropagate from a scalar `loss` (seed 1).
    pub fn backward(self, loss: &Var) -> Result<Grads> {
        if loss.value.numel() != 1 {
            return Err(Error::shape(
                "backward seed (scalar loss)",
                &[1],
                loss.dims(),
            ));
        }
        let seed = Tensor::from_vec(vec![1.0], loss.dims())?;
        self.backward_with(loss, seed)
    }

    /// Backpropagate from `out` with upstream gradient `grad` (same shape as `out`).
    pub fn backward_with(self, out: &Var, grad: Tensor) -> Result<Grads> {
        grad.expect_dims("backward seed", out.dims())?;
        let mut grads = Grads::default();
        let Some(out_id) = out.id else {
            return Ok(grads);
        };
        grads.accumulate(out_id, grad, "seed")?;
        for node in self.nodes.into_iter().rev() {
            let Some(g) = grads.map.get(&node.output).cloned() else {
                continue;
            };
            let input_grads = (node.backward)(&g)?;
            if input_grads.len() != node.inputs.len() {
                return Err(Error::invalid(format!(
                    "backward of {} returned {} gradients for {} inputs",
                    node.name,
                    input_grads.len(),
                    node.inputs.len()
                )));
            }
            for (inp, gi) in node.inputs.iter().zip(input_grads) {
                if let (Some(id), Some(gi)) = (inp, gi) {
                    grads.accumulate(*id, gi, node.name)?;
                }
            }
            // Intermediate gradients are dropped once consumed, to keep peak memory low; leaves
            // (ids that are never a node output) stay.
            grads.map.remove(&node.output);
        }
        Ok(grads)
    }
}

/// Gradients by variable id.
#[derive(Default)]
pub struct Grads {
    map: HashMap<VarId, Tensor>,
}

impl Grads {
    /// The gradient of `v`, if any reached it.
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        v.id.and_then(|id| self.map.get(&id))
    }

    /// Take the gradient of `v` out.
    pub fn take(&mut self, v: &Var) -> Option<Tensor> {
        v.id.and_then(|id| self.map.remove(&id))
    }

    fn accumulate(&mut self, id: VarId, g: Tensor, from: &str) -> Result<()> {
        match self.map.remove(&id) {
            None => {
                self.map.insert(id, g);
            }
            Some(prev) => {
                if prev.dims() != g.dims() {
                    return Err(Error::shape(
                        format!("gradient from {from}"),
                        prev.dims(),
                        g.dims(),
                    ));
                }
                let mut acc = prev.into_f32_vec()?;
                for (a, b) in acc.iter_mut().zip(g.f32s()?) {
                    *a += b;
                }
                let dims = g.dims().to_vec();
                self.map.insert(id, Tensor::from_vec(acc, &dims)?);
            }
        }
        Ok(())
    }
}

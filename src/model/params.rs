//! Named parameters in Hugging Face order, and their binding to a tape.

use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// A parameter's name (HF state-dict key) and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub dims: Vec<usize>,
}

/// Parameters by name, in a fixed order (the order of the specs that built them).
#[derive(Clone, Debug)]
pub struct ParamSet {
    specs: Vec<ParamSpec>,
    values: Vec<Tensor>,
}

impl ParamSet {
    /// Take every spec'd tensor from `map` (converted to f32), checking shapes; extra tensors in
    /// the map are ignored. `path` names the checkpoint in errors.
    pub fn from_map(
        specs: Vec<ParamSpec>,
        map: &BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<ParamSet> {
        let mut values = Vec::with_capacity(specs.len());
        for s in &specs {
            let t = map.get(&s.name).ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: s.name.clone(),
            })?;
            if t.dims() != s.dims.as_slice() {
                return Err(Error::Shape {
                    what: format!("{}: tensor {}", path.display(), s.name),
                    expected: s.dims.clone(),
                    got: t.dims().to_vec(),
                });
            }
            let t = t.to_f32();
            t.ensure_finite(&format!("{}: tensor {}", path.display(), s.name))?;
            values.push(t);
        }
        Ok(ParamSet { specs, values })
    }

    /// Build from values in spec order (shapes checked).
    pub fn from_values(specs: Vec<ParamSpec>, values: Vec<Tensor>) -> Result<ParamSet> {
        if specs.len() != values.len() {
            return Err(Error::invalid(format!(
                "{} specs, {} values",
                specs.len(),
                values.len()
            )));
        }
        for (s, v) in specs.iter().zip(&values) {
            v.expect_dims(&s.name, &s.dims)?;
        }
        Ok(ParamSet { specs, values })
    }

    /// The specs in order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The tensors in order.
    pub fn values(&self) -> &[Tensor] {
        &self.values
    }

    /// Replace all values (e.g. after an optimizer step); shapes must match.
    pub fn set_values(&mut self, values: Vec<Tensor>) -> Result<()> {
        *self = ParamSet::from_values(std::mem::take(&mut self.specs), values)?;
        Ok(())
    }

    /// Index of a named parameter.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// The tensor of a named parameter.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index(name).map(|i| &self.values[i])
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.values.iter().map(Tensor::numel).sum()
    }

    /// name -> tensor, for writing checkpoints.
    pub fn to_map(&self) -> BTreeMap<String, Tensor> {
        self.specs
            .iter()
            .zip(&self.values)
            .map(|(s, v)| (s.name.clone(), v.clone()))
            .collect()
    }

    /// Put every parameter on the tape (leaves when recording, constants otherwise).
    pub fn bind(&self, tape: &mut Tape) -> Vec<Var> {
        self.values.iter().map(|v| tape.leaf(v.clone())).collect()
    }
}

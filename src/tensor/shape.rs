//! Tensor dimensions.

use crate::error::{Error, Result};

/// Row-major dimensions of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// The two dimensions of a rank-2 shape.
    pub fn dims2(&self, what: &str) -> Result<(usize, usize)> {
        match self.0[..] {
            [a, b] => Ok((a, b)),
            _ => Err(Error::Shape {
                what: format!("{what} (rank 2 expected)"),
                expected: vec![],
                got: self.0.clone(),
            }),
        }
    }

    /// The three dimensions of a rank-3 shape.
    pub fn dims3(&self, what: &str) -> Result<(usize, usize, usize)> {
        match self.0[..] {
            [a, b, c] => Ok((a, b, c)),
            _ => Err(Error::Shape {
                what: format!("{what} (rank 3 expected)"),
                expected: vec![],
                got: self.0.clone(),
            }),
        }
    }

    /// Product of all dimensions but the last, and the last (rows, cols); a scalar is (1, 1).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.0.split_last() {
            Some((&last, rest)) => (rest.iter().product(), last),
            None => (1, 1),
        }
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

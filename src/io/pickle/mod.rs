//! A minimal, non-executing pickle VM for PyTorch state dicts, and the matching writer.
//!
//! Python's pickle is a small stack machine whose `GLOBAL` + `REDUCE` opcodes call arbitrary
//! Python callables: loading an untrusted pickle with Python runs code. This VM understands only
//! the opcodes `torch.save(state_dict)` emits and never calls anything:
//!
//! * `GLOBAL` / `STACK_GLOBAL` push a symbolic [`Object::Global`] (a name, nothing imported);
//! * `REDUCE` is interpreted for a whitelist only: `collections.OrderedDict()` (an empty dict),
//!   `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` (a [`TensorRef`] describing a view of a
//!   storage) and `torch._utils._rebuild_parameter` (the tensor itself); any other callable is an
//!   error that names it;
//! * `BINPERSID` turns torch's `('storage', <type>, key, location, numel)` tuple into a
//!   [`StorageRef`]; the storage type is checked later by the caller, which knows the tensor name;
//! * `BUILD` is accepted on dicts only (torch sets `_metadata` on state dicts) and ignored.
//!
//! Memory and time are bounded: the stack, memo, mark stack and object arena have hard limits, all
//! values live in a flat arena (no reference cycles, no recursive drops), memo gets are cheap
//! clones (strings are reference-counted), and nothing in the VM recurses.

mod vm;
mod writer;

pub use writer::PickleWriter;

use std::rc::Rc;

/// Index of an object in [`Unpickled::objects`].
pub type ObjId = usize;

/// Most values the stack may hold.
pub const MAX_STACK: usize = 1 << 20;
/// Most memo entries.
pub const MAX_MEMO: usize = 1 << 20;
/// Most objects (tuples, lists, dicts, globals, storages, tensors) one pickle may create.
pub const MAX_OBJECTS: usize = 1 << 21;
/// Most open MARKs.
pub const MAX_MARKS: usize = 1 << 16;
/// Highest tensor rank accepted in `_rebuild_tensor_v2`.
pub const MAX_RANK: usize = 64;

/// A pickle value. Containers and other heap objects are [`Value::Obj`] indices into the arena.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Obj(ObjId),
}

/// A heap object in the arena.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A dict or an `OrderedDict`, in insertion order (a repeated key keeps both pairs; readers
    /// take the last, as Python does).
    Dict(Vec<(Value, Value)>),
    /// A `module.name` reference, never resolved.
    Global {
        module: String,
        name: String,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// A persistent storage reference: `('storage', torch.FloatStorage, '0', 'cpu', 32)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    /// `module.name` of the storage type, e.g. `torch.HalfStorage`.
    pub storage_type: String,
    /// Record name under `<archive>/data/`.
    pub key: String,
    /// Device it was saved from (`cpu`, `cuda:0`); informational.
    pub location: String,
    /// Number of elements the storage holds.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// Offset of element 0, in elements.
    pub offset: u64,
    pub size: Vec<u64>,
    /// Strides in elements, one per dimension.
    pub stride: Vec<u64>,
}

/// The result of running a pickle: the object arena and the value `STOP` returned.
#[derive(Debug)]
pub struct Unpickled {
    pub objects: Vec<Object>,
    pub root: Value,
}

impl Unpickled {
    /// The object behind `v`, if `v` is an object reference.
    pub fn object(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Obj(id) => self.objects.get(*id),
            _ => None,
        }
    }
}

/// Why a pickle was refused: the byte offset of the opcode and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub msg: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.msg)
    }
}

impl std::error::Error for PickleError {}

/// Run the pickle in `data` and return what it builds. Never executes anything.
pub fn unpickle(data: &[u8]) -> std::result::Result<Unpickled, PickleError> {
    vm::run(data)
}

//! The interpreter loop: one `match` arm per supported opcode, the whitelisted REDUCE calls and
//! torch's persistent storage ids.

use super::{
    Object, PickleError, StorageRef, TensorRef, Unpickled, Value, MAX_MARKS, MAX_MEMO, MAX_OBJECTS,
    MAX_RANK, MAX_STACK,
};
use std::collections::HashMap;
use std::rc::Rc;

type R<T> = std::result::Result<T, String>;

/// Execute `data` to its STOP opcode.
pub(super) fn run(data: &[u8]) -> std::result::Result<Unpickled, PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
    };
    loop {
        let at = vm.pos;
        match vm.step() {
            Ok(Some(root)) => {
                return Ok(Unpickled {
                    objects: vm.objects,
                    root,
                })
            }
            Ok(None) => {}
            Err(msg) => return Err(PickleError { offset: at, msg }),
        }
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
}

impl Vm<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("truncated: {n} more bytes needed"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(1024)
            .position(|&b| b == b'\n')
            .ok_or("GLOBAL name without a newline within 1024 bytes")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?;
        let s = s.to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> R<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "string is not valid UTF-8")?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn push(&mut self, v: Value) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("stack deeper than {MAX_STACK}"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn alloc(&mut self, o: Object) -> R<Value> {
        if self.objects.len() >= MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects"));
        }
        self.objects.push(o);
        Ok(Value::Obj(self.objects.len() - 1))
    }

    /// Lowest stack index the current frame (since the last MARK) may pop to.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> R<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> R<&Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    /// Pop everything above the last MARK and the mark itself.
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn memo_put(&mut self, idx: u32) -> R<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(format!("memo larger than {MAX_MEMO}"));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> R<()> {
        let v = self.memo.get(&idx).cloned();
        self.push(v.ok_or_else(|| format!("memo key {idx} not defined"))?)
    }

    fn obj_mut(&mut self, v: &Value) -> Option<&mut Object> {
        match v {
            Value::Obj(id) => self.objects.get_mut(*id),
            _ => None,
        }
    }

    fn tuple_items(&self, v: &Value) -> R<Vec<Value>> {
        match v {
            Value::Obj(id) => match self.objects.get(*id) {
                Some(Object::Tuple(items)) => Ok(items.clone()),
                _ => Err("expected a tuple".into()),
            },
            _ => Err("expected a tuple".into()),
        }
    }

    fn set_items(&mut self, dict: &Value, items: Vec<Value>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        match self.obj_mut(dict) {
            Some(Object::Dict(d)) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            _ => Err("SETITEM(S) target is not a dict".into()),
        }
    }

    fn append(&mut self, list: &Value, items: Vec<Value>) -> R<()> {
        match self.obj_mut(list) {
            Some(Object::List(l)) => {
                l.extend(items);
                Ok(())
            }
            _ => Err("APPEND(S) target is not a list".into()),
        }
    }

    /// Execute one opcode; `Some(root)` at STOP.
    fn step(&mut self) -> R<Option<Value>> {
        let [op] = self
            .arr::<1>()
            .map_err(|_| "truncated: no STOP opcode".to_string())?;
        match op {
            0x80 => {
                let [v] = self.arr::<1>()?;
                if v > 5 {
                    return Err(format!("unsupported pickle protocol {v}"));
                }
            }
            0x95 => {
                self.arr::<8>()?; // FRAME: a length hint, the opcodes follow inline
            }
            b'.' => return self.pop().map(Some),
            b'(' => {
                if self.marks.len() >= MAX_MARKS {
                    return Err(format!("more than {MAX_MARKS} nested MARKs"));
                }
                self.marks.push(self.stack.len());
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'0' => {
                self.pop()?;
            }
            b'}' => {
                let v = self.alloc(Object::Dict(Vec::new()))?;
                self.push(v)?;
            }
            b']' => {
                let v = self.alloc(Object::List(Vec::new()))?;
                self.push(v)?;
            }
            b')' => {
                let v = self.alloc(Object::Tuple(Vec::new()))?;
                self.push(v)?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                let d = self.alloc(Object::Dict(Vec::new()))?;
                self.set_items(&d, items)?;
                self.push(d)?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                let v = self.alloc(Object::List(items))?;
                self.push(v)?;
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.alloc(Object::Tuple(items))?;
                self.push(v)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = (0..n).map(|_| self.pop()).collect::<R<Vec<_>>>()?;
                items.reverse();
                let v = self.alloc(Object::Tuple(items))?;
                self.push(v)?;
            }
            b'X' => {
                let n = u32::from_le_bytes(self.arr()?) as usize;
                let v = self.string(n)?;
                self.push(v)?;
            }
            0x8c => {
                let [n] = self.arr::<1>()?;
                let v = self.string(usize::from(n))?;
                self.push(v)?;
            }
            0x8d => {
                let n = usize::try_from(u64::from_le_bytes(self.arr()?)).unwrap_or(usize::MAX);
                let v = self.string(n)?;
                self.push(v)?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.arr()?);
                self.push(Value::Int(i64::from(v)))?;
            }
            b'K' => {
                let [v] = self.arr::<1>()?;
                self.push(Value::Int(i64::from(v)))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.arr()?);
                self.push(Value::Int(i64::from(v)))?;
            }
            0x8a => {
                let [n] = self.arr::<1>()?;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes does not fit in 64 bits"));
                }
                let b = self.take(usize::from(n))?;
                let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                a[..b.len()].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(a)))?;
            }
            b'G' => {
                let v = f64::from_be_bytes(self.arr()?);
                self.push(Value::Float(v))?;
            }
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'N' => self.push(Value::None)?,
            b'q' => {
                let [i] = self.arr::<1>()?;
                self.memo_put(u32::from(i))?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.arr()?);
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let [i] = self.arr::<1>()?;
                self.memo_get(u32::from(i))?;
            }
            b'j' => {
                let i = u32::from_le_bytes(self.arr()?);
                self.memo_get(i)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?.clone();
                self.set_items(&d, vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let d = self.top()?.clone();
                self.set_items(&d, items)?;
            }
            b'a' => {
                let v = self.pop()?;
                let l = self.top()?.clone();
                self.append(&l, vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                let l = self.top()?.clone();
                self.append(&l, items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let v = self.alloc(Object::Global { module, name })?;
                self.push(v)?;
            }
            0x93 => {
                let (name, module) = (self.pop()?, self.pop()?);
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                let g = Object::Global {
                    module: module.to_string(),
                    name: name.to_string(),
                };
                let v = self.alloc(g)?;
                self.push(v)?;
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.reduce(&callable, &args)?;
                self.push(v)?;
            }
            b'b' => {
                let _state = self.pop()?;
                let target = self.top()?.clone();
                match self.obj_mut(&target) {
                    Some(Object::Dict(_)) => {} // e.g. OrderedDict._metadata: not needed
                    _ => return Err("BUILD is only supported on dicts".into()),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let s = self.persistent_storage(&pid)?;
                let v = self.alloc(Object::Storage(s))?;
                self.push(v)?;
            }
            _ => {
                let shown = if op.is_ascii_graphic() {
                    format!(" ('{}')", op as char)
                } else {
                    String::new()
                };
                return Err(format!(
                    "unsupported pickle opcode 0x{op:02x}{shown}: only the opcodes of torch state \
                     dicts are understood"
                ));
            }
        }
        Ok(None)
    }

    /// torch's persistent id: `('storage', storage_type, key, location, numel)`.
    fn persistent_storage(&self, pid: &Value) -> R<StorageRef> {
        let items = self
            .tuple_items(pid)
            .map_err(|_| "persistent id is not a tuple".to_string())?;
        let [tag, ty, key, location, numel] = &items[..] else {
            return Err(format!(
                "persistent id has {} items, expected 5",
                items.len()
            ));
        };
        if !matches!(tag, Value::Str(s) if &**s == "storage") {
            return Err("persistent id is not a 'storage' record".into());
        }
        let storage_type = match ty {
            Value::Obj(id) => match self.objects.get(*id) {
                Some(Object::Global { module, name }) => format!("{module}.{name}"),
                _ => return Err("storage type is not a global".into()),
            },
            _ => return Err("storage type is not a global".into()),
        };
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err("storage key is not a string".into()),
        };
        let location = match location {
            Value::Str(s) => s.to_string(),
            _ => return Err("storage location is not a string".into()),
        };
        let numel = match numel {
            Value::Int(n) if *n >= 0 => *n as u64,
            _ => return Err("storage size is not a non-negative int".into()),
        };
        Ok(StorageRef {
            storage_type,
            key,
            location,
            numel,
        })
    }

    fn dims(&self, v: &Value, what: &str) -> R<Vec<u64>> {
        let items = self
            .tuple_items(v)
            .map_err(|_| format!("tensor {what} is not a tuple"))?;
        if items.len() > MAX_RANK {
            return Err(format!("tensor rank {} exceeds {MAX_RANK}", items.len()));
        }
        items
            .iter()
            .map(|x| match x {
                Value::Int(n) if *n >= 0 => Ok(*n as u64),
                _ => Err(format!("tensor {what} holds a non-negative-int value")),
            })
            .collect()
    }

    /// REDUCE for the whitelisted callables; anything else is refused by name.
    fn reduce(&mut self, callable: &Value, args: &Value) -> R<Value> {
        let (module, name) = match callable {
            Value::Obj(id) => match self.objects.get(*id) {
                Some(Object::Global { module, name }) => (module.clone(), name.clone()),
                _ => return Err("REDUCE callable is not a global".into()),
            },
            _ => return Err("REDUCE callable is not a global".into()),
        };
        let args = self
            .tuple_items(args)
            .map_err(|_| format!("arguments of {module}.{name} are not a tuple"))?;
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => {
                if !args.is_empty() {
                    return Err("collections.OrderedDict with arguments is not supported".into());
                }
                self.alloc(Object::Dict(Vec::new()))
            }
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let want = if name == "_rebuild_tensor" {
                    4..=4
                } else {
                    6..=7
                };
                if !want.contains(&args.len()) {
                    return Err(format!("{module}.{name} with {} arguments", args.len()));
                }
                let storage = match self.object_of(&args[0]) {
                    Some(Object::Storage(s)) => s.clone(),
                    _ => return Err(format!("{module}.{name}: first argument is not a storage")),
                };
                let offset = match args[1] {
                    Value::Int(n) if n >= 0 => n as u64,
                    _ => return Err(format!("{module}.{name}: bad storage offset")),
                };
                let size = self.dims(&args[2], "size")?;
                let stride = self.dims(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(format!(
                        "tensor size has {} dims but stride has {}",
                        size.len(),
                        stride.len()
                    ));
                }
                self.alloc(Object::Tensor(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                }))
            }
            ("torch._utils", "_rebuild_parameter") => match args.first() {
                Some(t @ Value::Obj(_)) if matches!(self.object_of(t), Some(Object::Tensor(_))) => {
                    Ok(t.clone())
                }
                _ => Err("torch._utils._rebuild_parameter: first argument is not a tensor".into()),
            },
            _ => Err(format!(
                "refusing to call {module}.{name}: only collections.OrderedDict and \
                 torch._utils._rebuild_tensor_v2/_rebuild_parameter are allowed in a state dict"
            )),
        }
    }

    fn object_of(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Obj(id) => self.objects.get(*id),
            _ => None,
        }
    }
}

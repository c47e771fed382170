// SPDX-License-Identifier: Apache-2.0
//! The Service maps in memory, for tests: every call is recorded in order,
//! and every write is checked against what a packet could see at that
//! moment (a slot naming a missing or terminating backend, a backend
//! removed while a frontend names it, an id reused while live).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::engine::{Backend, Frontend, FrontendState, ServiceTarget};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    SetBackend(u32),
    RemoveBackend(u32),
    SetFrontend(Frontend),
    RemoveFrontend(Frontend),
}

#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    pub backends: BTreeMap<u32, Backend>,
    pub calls: Vec<Call>,
    /// What a packet could have seen go wrong.
    pub problems: Vec<String>,
    /// Writes left before one fails.
    fail_in: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("the fake maps refused a write")]
pub struct FakeError;

/// Shared, so a test can look at the maps a thread writes.
#[derive(Clone, Debug, Default)]
pub struct Fake(pub Arc<Mutex<FakeMaps>>);

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeMaps> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn maps(&self) -> FakeMaps {
        self.lock().clone()
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.lock().calls)
    }

    /// The write after `n` more succeed fails (once).
    pub fn fail_at(&self, n: usize) {
        self.lock().fail_in = Some(n);
    }

    pub fn assert_consistent(&self) {
        let m = self.lock();
        assert!(m.problems.is_empty(), "{:?}", m.problems);
    }

    fn write(&self, call: Call, f: impl FnOnce(&mut FakeMaps)) -> Result<(), FakeError> {
        let mut m = self.lock();
        match m.fail_in {
            Some(0) => {
                m.fail_in = None;
                return Err(FakeError);
            }
            Some(n) => m.fail_in = Some(n - 1),
            None => {}
        }
        m.calls.push(call);
        f(&mut m);
        Ok(())
    }
}

impl ServiceTarget for Fake {
    type Error = FakeError;

    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, FakeError> {
        Ok(self
            .lock()
            .frontends
            .iter()
            .map(|(f, s)| (*f, s.clone()))
            .collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, FakeError> {
        Ok(self.lock().backends.iter().map(|(i, b)| (*i, *b)).collect())
    }

    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), FakeError> {
        self.write(Call::SetBackend(id), |m| {
            if id == 0 {
                m.problems.push("backend id 0".into());
            }
            if let Some(old) = m.backends.get(&id) {
                if (old.frontend, old.addr, old.port) != (b.frontend, b.addr, b.port) {
                    m.problems
                        .push(format!("backend {id} reused while live: {old:?} -> {b:?}"));
                }
            }
            m.backends.insert(id, *b);
        })
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), FakeError> {
        self.write(Call::RemoveBackend(id), |m| {
            if m.frontends.values().any(|s| s.backends.contains(&id)) {
                m.problems
                    .push(format!("backend {id} removed while a frontend names it"));
            }
            m.backends.remove(&id);
        })
    }

    fn set_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), FakeError> {
        self.write(Call::SetFrontend(*fe), |m| {
            if st.id == 0 {
                m.problems.push(format!("{fe:?}: id 0"));
            }
            if m.frontends.iter().any(|(f, s)| f != fe && s.id == st.id) {
                m.problems.push(format!("{fe:?}: id {} is live", st.id));
            }
            for id in &st.backends {
                match m.backends.get(id) {
                    None => m.problems.push(format!("{fe:?}: slot {id} not written")),
                    Some(b) if b.terminating => {
                        m.problems.push(format!("{fe:?}: slot {id} terminating"))
                    }
                    Some(b) if b.frontend != st.id => m
                        .problems
                        .push(format!("{fe:?}: slot {id} of another frontend")),
                    Some(_) => {}
                }
            }
            m.frontends.insert(*fe, st.clone());
        })
    }

    fn remove_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), FakeError> {
        self.write(Call::RemoveFrontend(*fe), |m| {
            if m.frontends.get(fe) != Some(st) {
                m.problems
                    .push(format!("{fe:?}: removed as {st:?}, not held"));
            }
            m.frontends.remove(fe);
        })
    }
}

//! The instances of one provider: a fresh Store per call (or, with
//! `instances.reuse`, a kept instance of the same subject), armed with the call's
//! deadline, fuel and limit record, checked back in clean or discarded.

use super::*;

/// An instance and its Store: for one call, or kept between calls of one subject
/// (`instances.reuse`).
pub(super) struct Warm {
    pub(super) store: Store<StoreState>,
    pub(super) captured: Captured,
    /// `None` until the first call instantiates it.
    pub(super) instance: Option<Arc<Provider>>,
    /// Calls served, including the current one.
    pub(super) calls: u32,
    /// The only subject this instance serves.
    pub(super) subject: Option<String>,
    /// The current call's deadline (set by `arm`).
    pub(super) deadline: state::CallDeadline,
}

/// One call's captured output and limit record.
pub(super) struct Captured {
    pub(super) stdout: CapturePipe,
    pub(super) stderr: CapturePipe,
    pub(super) hits: Arc<CallHits>,
}

impl ProviderRuntime {
    /// A new Store (not yet instantiated) for calls of `subject`.
    pub(super) fn new_warm(&self, runtime: &Runtime, subject: Option<&str>) -> Warm {
        let cap = usize::try_from(self.limits.max_output_bytes).unwrap_or(usize::MAX);
        let hits = Arc::new(CallHits::default());
        let captured = Captured {
            stdout: CapturePipe::new(cap, hits.clone()),
            stderr: CapturePipe::new(cap, hits.clone()),
            hits,
        };
        // Nothing inherited: no env, args, preopened dirs or network.
        let wasi = WasiCtx::builder()
            .stdout(captured.stdout.clone())
            .stderr(captured.stderr.clone())
            .wall_clock(WasiWallClock(runtime.clock.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        // Everything the host allocates on the plugin's behalf is bounded: table
        // entries (fields, requests, streams…), each fields object's size, random
        // bytes per call, requests in flight (egress).
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.limits.max_host_resources as usize);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(FIELD_SIZE_LIMIT);
        let mut store = Store::new(
            &runtime.engine,
            StoreState {
                table,
                wasi,
                http,
                hooks: EgressHooks::new(self.egress.clone(), captured.hits.clone()),
                config: self.config.clone(),
                state: CallState::new(self.state.clone()),
                limiter: CallLimiter {
                    memory_bytes: usize::try_from(self.limits.memory_mib << 20)
                        .unwrap_or(usize::MAX),
                    hits: captured.hits.clone(),
                    used: 0,
                },
            },
        );
        if runtime.limit_memory {
            store.limiter(|s| &mut s.limiter);
        }
        Warm {
            store,
            captured,
            instance: None,
            calls: 0,
            subject: subject.map(str::to_string),
            deadline: state::CallDeadline::default(),
        }
    }

    /// An instance for one call of `subject`: a kept one for the same subject when
    /// `instances.reuse` is on and one is idle, else a new Store. Armed for the
    /// call: deadline, fuel, a clean limit record.
    pub(super) fn checkout(
        &self,
        runtime: &Runtime,
        function: &'static str,
        subject: Option<&str>,
    ) -> Result<Warm, Error> {
        let kept = if self.instances.reuse {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter()
                .rposition(|w| w.subject.as_deref() == subject)
                .map(|i| idle.remove(i))
        } else {
            None
        };
        let mut warm = match kept {
            Some(warm) => {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                warm
            }
            None => self.new_warm(runtime, subject),
        };
        warm.calls += 1;
        self.arm(runtime, function, &mut warm)?;
        Ok(warm)
    }

    /// Prepare `warm` for one call: a clean limit record, the call's deadline and
    /// its fuel.
    pub(super) fn arm(
        &self,
        runtime: &Runtime,
        function: &'static str,
        warm: &mut Warm,
    ) -> Result<(), Error> {
        warm.captured.hits.clear();
        let store = &mut warm.store;
        let deadline = store
            .data_mut()
            .state
            .arm(Duration::from_millis(self.limits.timeout_ms));
        warm.deadline = deadline.clone();
        if runtime.epoch_interruption {
            // Every epoch tick a running guest yields to the executor, so a plugin
            // stuck in a loop never starves the other tasks of its thread; at the
            // call's deadline it traps (`Trap::Interrupt`), even if nobody polls
            // the tokio timeout around the call. (The deadline moves later by the
            // time the call waited for its state.)
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| {
                Ok(if Instant::now() >= deadline.at() {
                    UpdateDeadline::Interrupt
                } else {
                    // tokio's yield lets the runtime poll its I/O and timer
                    // driver before the guest resumes (a plain re-wake would
                    // wait for the driver's turn, every 61 polls).
                    UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
                })
            });
        }
        if runtime.consume_fuel {
            store
                .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| self.fault(function, e))?;
        }
        Ok(())
    }

    /// After a call: keep the instance for its subject if reuse is on, the call
    /// finished cleanly (no trap, timeout or limit: `clean`) and it has calls left;
    /// otherwise drop it (and its Store) now.
    pub(super) fn checkin(&self, mut warm: Warm, clean: bool) {
        // A kept instance holds only the provider's own config (a call's
        // borrowed values end with the call).
        if !self.credential_keys.is_empty() {
            warm.store.data_mut().config = self.config.clone();
        }
        // An instance with requests still in flight would keep holding egress
        // places while idle: it is not kept.
        let quiet = {
            let hooks = &warm.store.data().hooks;
            hooks.in_flight.available_permits() == hooks.policy.max_per_call
        };
        if !(self.instances.reuse
            && clean
            && quiet
            && warm.instance.is_some()
            && warm.calls < self.instances.max_calls)
        {
            return;
        }
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push(warm);
            let max = usize::try_from(self.instances.max_idle).unwrap_or(usize::MAX);
            let excess = idle.len().saturating_sub(max);
            idle.drain(..excess).collect::<Vec<_>>()
        };
        drop(evicted);
    }

    /// Drop every kept instance (a reload, or a test that wants fresh ones).
    pub fn discard_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        drop(idle);
    }

    /// Kept instances, idle right now.
    pub fn idle_instances(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Book what a finished call cost (fuel, linear memory) in the provider's
    /// metrics.
    pub(super) fn account(&self, runtime: &Runtime, warm: &Warm) {
        let Some(metrics) = self.metrics.get() else {
            return;
        };
        let fuel = if runtime.consume_fuel {
            let left = warm.store.get_fuel().unwrap_or(0);
            self.limits.fuel.unwrap_or(u64::MAX).saturating_sub(left)
        } else {
            0
        };
        let memory = u64::try_from(warm.store.data().limiter.used).unwrap_or(u64::MAX);
        metrics.call_cost(fuel, memory);
    }

    /// The instance of `warm`, instantiated now if it has none yet.
    pub(super) async fn instance(&self, warm: &mut Warm) -> wasmtime::Result<Arc<Provider>> {
        if let Some(instance) = &warm.instance {
            return Ok(instance.clone());
        }
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let instance = Arc::new(self.pre.instantiate_async(&mut warm.store).await?);
        warm.instance = Some(instance.clone());
        Ok(instance)
    }
}

//! One plugin call: the per-call Store data, the call slot and fetch budget, the
//! circuit breaker's admission, the call under its deadline, and what its result
//! becomes (a credential checked against the contract, or an error naming the
//! provider and the limit).

use super::*;

/// The per-call Store data.
pub(crate) struct StoreState {
    pub(super) table: ResourceTable,
    pub(super) wasi: WasiCtx,
    pub(super) http: WasiHttpCtx,
    pub(super) hooks: EgressHooks,
    pub(super) config: Arc<WasiConfigVariables>,
    pub(super) state: CallState,
    pub(super) limiter: CallLimiter,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// What `state` answers while the guest runs `describe` (which must not touch it:
/// `reauth check` has no side effects, and takes no state lock).
const DESCRIBE_NO_STATE: &str = "no state during `describe`";

/// The `state` interface of both contract versions: one implementation.
macro_rules! state_host {
    ($($state:path),*) => {$(
        impl $state for StoreState {
            async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                if self.hooks.describing {
                    return Ok(None);
                }
                self.state.get(&key).await
            }

            async fn set(
                &mut self,
                key: String,
                value: String,
            ) -> wasmtime::Result<Result<(), String>> {
                if self.hooks.describing {
                    return Ok(Err(DESCRIBE_NO_STATE.into()));
                }
                self.state.set(key, value).await
            }

            async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
                if self.hooks.describing {
                    return Ok(Err(DESCRIBE_NO_STATE.into()));
                }
                self.state.delete(&key).await
            }
        }
    )*};
}
state_host!(
    bindings::v02::reauth::provider::state::Host,
    bindings::v01::reauth::provider0_1_0::state::Host
);

impl ProviderRuntime {
    /// Wait for this fetch's turn in the provider's budget (`[rate]`), or refuse
    /// it with [`Error::Throttled`] when the turn is further off than
    /// `rate.wait_ms`. For a caller that does work of its own before the call
    /// (the host resolving `{ credential = … }` values), which then calls with
    /// [`Budget::Taken`].
    pub async fn take_fetch_budget(&self) -> Result<(), Error> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        match bucket.acquire().await {
            Ok(waited) => {
                if !waited.is_zero()
                    && let Some(m) = self.metrics.get()
                {
                    m.fetch_budget_waited(waited);
                }
                Ok(())
            }
            Err(over) => {
                if let Some(m) = self.metrics.get() {
                    m.fetch_throttled();
                }
                let retry_in_ms = u64::try_from(over.retry_in.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(provider = %self.name, retry_in_ms, "fetch refused: over the provider's fetch budget (rate.fetches_per_second)");
                Err(Error::Throttled {
                    provider: self.name.to_string(),
                    per_second: bucket.rate(),
                    burst: self.rate.burst,
                    retry_in_ms,
                })
            }
        }
    }

    /// A redactor for one call's output: the config values, the state's values and
    /// any secret the call returned.
    pub(super) fn call_redactor(&self, returned: Option<&types::Credentials>) -> Redactor {
        let mut redactor = self.redactor.clone();
        match self.described.get() {
            Some(described) => {
                for value in &described.secrets {
                    redactor.add(value.expose());
                }
            }
            // Which keys it declares secret is not known yet (its `describe`
            // failed or has not run): every config value is redacted.
            None => {
                for (_, value) in &self.settings {
                    redactor.add(value.expose());
                }
            }
        }
        for value in self.state.values() {
            redactor.add(&value);
        }
        for (_, value) in self
            .borrowed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            redactor.add(value.expose());
        }
        if let Some(c) = returned {
            match &c.credential {
                types::Credential::Basic { password, .. } => redactor.add(password.expose()),
                types::Credential::Bearer(token) => redactor.add(token.expose()),
                types::Credential::Headers(h) => {
                    h.iter().for_each(|(_, v)| redactor.add(v.expose()))
                }
            }
        }
        redactor
    }

    /// Log what the call wrote, with the secrets known after `returned` redacted
    /// (the redactor is only built when there is output): at INFO, or at WARN when
    /// the call failed (a traceback an author must see at the default level).
    pub(super) fn log_output(
        &self,
        function: &str,
        captured: &Captured,
        returned: Option<&types::Credentials>,
        failed: bool,
    ) {
        let mut redactor = None;
        for (stream, pipe) in [("stdout", &captured.stdout), ("stderr", &captured.stderr)] {
            let bytes = pipe.take();
            if bytes.is_empty() {
                continue;
            }
            let redactor = redactor.get_or_insert_with(|| self.call_redactor(returned));
            // Redact the whole capture before cutting it, so that no prefix of a
            // secret survives the cut.
            let text = String::from_utf8_lossy(&bytes);
            let text = redactor.redact(&text);
            let mut end = text.len().min(OUTPUT_LOGGED);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            for line in text[..end].lines().filter(|l| !l.trim().is_empty()) {
                if failed {
                    tracing::warn!(provider = %self.name, function, stream, "{line}");
                } else {
                    tracing::info!(provider = %self.name, function, stream, "{line}");
                }
            }
            if bytes.len() > OUTPUT_LOGGED {
                tracing::info!(provider = %self.name, function, stream, total = bytes.len(), "output truncated");
            }
        }
    }

    pub(super) fn limit(&self, function: &'static str, limit: LimitKind, detail: String) -> Error {
        Error::Limit {
            provider: self.name.to_string(),
            function,
            limit,
            detail,
        }
    }

    /// Map a call's failure to the error naming what happened: a limit the call hit
    /// (whatever the guest made of it), a timeout, or the trap.
    pub(super) fn fault(&self, function: &'static str, e: wasmtime::Error) -> Error {
        if let Some(StateFault(fault)) = e.downcast_ref::<StateFault>() {
            return self.state_error(fault);
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => return self.timeout(function),
            Some(Trap::OutOfFuel) => {
                return self.limit(
                    function,
                    LimitKind::Fuel,
                    format!(
                        "the call used all of its {} fuel",
                        self.limits.fuel.unwrap_or(u64::MAX)
                    ),
                );
            }
            Some(Trap::StackOverflow) => {
                return self.limit(
                    function,
                    LimitKind::Stack,
                    "the WebAssembly stack overflowed (runaway recursion?)".into(),
                );
            }
            _ => {}
        }
        // The message can carry text the plugin controls (a header name, a URL):
        // it passes the redactor like everything else the plugin says.
        let message = self
            .call_redactor(None)
            .redact(&format!("{e:#}"))
            .into_owned();
        if e.downcast_ref::<wasmtime::component::ResourceTableError>()
            .is_some_and(|t| matches!(t, wasmtime::component::ResourceTableError::Full))
            || message.contains("resource table has no free keys")
        {
            return self.limit(
                function,
                LimitKind::HostResources,
                format!(
                    "the plugin held more than {} host-side objects (HTTP fields, requests, streams…) at once",
                    self.limits.max_host_resources
                ),
            );
        }
        if message.contains("requested len") && message.contains("exceeds limit") {
            return self.limit(
                function,
                LimitKind::HostResources,
                format!("a get-random-bytes call asked for more than {MAX_RANDOM_BYTES} bytes"),
            );
        }
        if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            // The engine's pool ran out (reservations keep this from happening
            // but for a reload's overlap): not the provider's fault.
            tracing::warn!(provider = %self.name, function, "the engine's instance pool is exhausted: {message}");
            return Error::Busy {
                provider: self.name.to_string(),
                max_concurrent_calls: self.limits.max_concurrent_calls,
                waited_ms: 0,
            };
        }
        Error::Plugin {
            provider: self.name.to_string(),
            function,
            source: message.into(),
        }
    }

    /// Wait (at most `limits.queue_timeout_ms`) for one of the provider's
    /// `limits.max_concurrent_calls` slots: the bulkhead that keeps one provider
    /// from taking what others need. Held for the whole call.
    pub(super) async fn call_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        if let Ok(permit) = self.call_slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        self.stats.slot_waits.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let wait = Duration::from_millis(self.limits.queue_timeout_ms);
        match tokio::time::timeout(wait, self.call_slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(provider = %self.name, max_concurrent_calls = self.limits.max_concurrent_calls, waited_ms, "all call slots busy; call refused");
                Err(Error::Busy {
                    provider: self.name.to_string(),
                    max_concurrent_calls: self.limits.max_concurrent_calls,
                    waited_ms,
                })
            }
        }
    }

    pub(super) fn state_error(&self, fault: &crate::store::StoreError) -> Error {
        let holder = match fault {
            crate::store::StoreError::Locked { holder, .. } => *holder,
            _ => None,
        };
        tracing::warn!(provider = %self.name, "{fault}");
        Error::State {
            provider: self.name.to_string(),
            detail: fault.to_string(),
            holder,
        }
    }

    pub(super) fn timeout(&self, function: &'static str) -> Error {
        Error::Timeout {
            provider: self.name.to_string(),
            function,
            timeout_ms: self.limits.timeout_ms,
        }
    }

    /// Settle a finished (or timed-out) call: a limit it hit comes first (output
    /// past the cap included: the capture records it), then a timeout or trap. A
    /// call that succeeded although its output was cut keeps its result.
    pub(super) fn settle<T>(
        &self,
        function: &'static str,
        outcome: Result<wasmtime::Result<T>, state::TimedOut>,
        captured: &Captured,
    ) -> Result<T, Error> {
        match (outcome, captured.hits.get()) {
            (Ok(Ok(value)), hit) => {
                if let Some((LimitKind::Output, _)) = hit {
                    tracing::warn!(provider = %self.name, function, cap = self.limits.max_output_bytes, "plugin output reached limits.max_output_bytes; the rest was dropped");
                }
                Ok(value)
            }
            (_, Some((kind, detail))) => Err(self.limit(function, kind, detail)),
            (Err(_), None) => Err(self.timeout(function)),
            (Ok(Err(e)), None) => Err(self.fault(function, e)),
        }
    }

    /// Book a call's result with the breaker and the fault counter. A call that
    /// never got a slot ([`Error::Busy`]) is neither a fault nor a success.
    pub(super) fn book<T>(&self, function: &'static str, result: &Result<T, Error>) {
        if let Err(Error::Busy { .. } | Error::Throttled { .. }) = result {
            return;
        }
        let fault = match result {
            Err(e @ (Error::Plugin { .. } | Error::Timeout { .. } | Error::Limit { .. })) => {
                Some(e.to_string())
            }
            _ => None,
        };
        if let Some(message) = &fault {
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(provider = %self.name, function, "plugin fault; its instance is discarded: {message}");
        }
        if let Some(cooldown) = self.breaker.record(fault.as_deref()) {
            tracing::error!(
                provider = %self.name,
                cooldown_ms = cooldown.as_millis() as u64,
                faults = self.breaker.status().consecutive_faults,
                "provider keeps faulting; cooling it down"
            );
        }
    }

    /// One warn line when fetches start failing (naming the last request that
    /// failed: discovery or token endpoint, and how), one info line when they
    /// recover; nothing in between (the cache's backoff bounds the attempts).
    pub(super) fn track_health(&self, result: &Result<types::Credentials, Error>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            // Not the provider's doing, or already logged by the breaker.
            Err(Error::Busy { .. } | Error::Throttled { .. } | Error::CoolingDown { .. }) => {}
            Err(e) => {
                health.failures = health.failures.saturating_add(1);
                if health.failing_since.is_none() {
                    health.failing_since = Some(Instant::now());
                    let last = self
                        .egress
                        .last_failure()
                        .unwrap_or_else(|| "none".to_string());
                    tracing::warn!(provider = %self.name, error = %e, last_failed_request = %last, "fetches are failing (logged again when they recover)");
                }
            }
            Ok(_) => {
                if let Some(since) = health.failing_since.take() {
                    let failed = std::mem::take(&mut health.failures);
                    tracing::info!(provider = %self.name, failed_fetches = failed, failing_for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX), "fetches recovered");
                }
                self.egress.clear_failure();
            }
        }
    }

    pub(super) fn admit(&self) -> Result<(), Error> {
        self.breaker.admit().map_err(|(faults, left, last_fault)| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            Error::CoolingDown {
                provider: self.name.to_string(),
                faults,
                retry_in_ms: left.as_millis().try_into().unwrap_or(u64::MAX),
                last_fault,
            }
        })
    }

    /// What the component says about itself, asked of `provider` in `store` unless
    /// known already; with the provider's config checked against its schema. A
    /// 0.1.0 component declares nothing. An unusable descriptor is a fault.
    pub(super) async fn ensure_described(
        &self,
        provider: &Provider,
        store: &mut Store<StoreState>,
    ) -> wasmtime::Result<&Described> {
        if let Some(described) = self.described.get() {
            return Ok(described);
        }
        store.data_mut().hooks.describing = true;
        let described = provider.describe(&mut *store).await;
        store.data_mut().hooks.describing = false;
        let descriptor = bindings::descriptor_from_guest(described?);
        if let Some(defect) = descriptor.defect() {
            return Err(wasmtime::Error::msg(format!(
                "describe returned an unusable descriptor: {defect}"
            )));
        }
        let violations = match &descriptor.config {
            Some(schema) => crate::schema::check(
                schema,
                self.settings
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.expose())))
                    .chain(self.credential_keys.iter().map(|k| (k.as_str(), None))),
            ),
            None => Vec::new(),
        };
        let secrets = descriptor
            .secret_keys()
            .filter_map(|key| self.settings.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v.clone())
            .collect();
        if !violations.is_empty() {
            tracing::warn!(provider = %self.name, "the config does not fit the provider's schema: {}", violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
        }
        let _ = self.described.set(Described {
            descriptor: Arc::new(descriptor),
            violations,
            secrets,
        });
        Ok(self.described.get().expect("set above"))
    }

    /// What the component said about itself, if it was asked already.
    pub fn described(&self) -> Option<&Described> {
        self.described.get()
    }

    /// The `misconfigured` error for a config that breaks the provider's schema.
    pub(super) fn schema_error(&self, described: &Described) -> Option<wit::ProviderError> {
        (!described.violations.is_empty()).then(|| {
            wit::ProviderError::Misconfigured(format!(
                "the config does not fit the provider's schema: {}",
                described
                    .violations
                    .iter()
                    .map(|v| format!("providers.{}.config.{}: {}", self.name, v.key, v.problem))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })
    }

    /// Instantiate the component once in a fresh Store and ask it to describe
    /// itself (what `reauth check` does to prove a provider can run), without
    /// calling it for credentials.
    pub async fn describe(&self, runtime: &Runtime) -> Result<&Described, Error> {
        const FUNCTION: &str = "describe";
        if let Some(described) = self.described.get() {
            return Ok(described);
        }
        let _slot = self.call_slot().await?;
        let mut warm = self.new_warm(runtime, None);
        self.arm(runtime, FUNCTION, &mut warm)?;
        let deadline = warm.deadline.clone();
        let call = async {
            let provider = self.pre.instantiate_async(&mut warm.store).await?;
            self.ensure_described(&provider, &mut warm.store)
                .await
                .map(drop)
        };
        let outcome = state::until(&deadline, call).await;
        warm.store
            .data_mut()
            .state
            .finish(matches!(outcome, Ok(Ok(_))));
        let captured = &warm.captured;
        let result = self.settle(FUNCTION, outcome, captured);
        self.account(runtime, &warm);
        self.log_output(FUNCTION, captured, None, result.is_err());
        self.book(FUNCTION, &result);
        result?;
        Ok(self.described.get().expect("described by the call"))
    }

    /// The contract version the component was built against (`0.2.0`, `0.1.0`).
    pub fn contract(&self) -> &'static str {
        self.pre.contract()
    }

    /// Call `get-credentials`, in a fresh instance (or, with `instances.reuse`, one
    /// kept for the same subject).
    pub async fn get_credentials(
        &self,
        runtime: &Runtime,
        request: &types::Request,
    ) -> Result<types::Credentials, Error> {
        self.get_credentials_with(runtime, request, &[], Budget::Take)
            .await
    }

    /// [`ProviderRuntime::get_credentials`] with `borrowed` config values added
    /// for this call: the values of its `{ credential = … }` keys (other
    /// providers' credentials, resolved by the host). They are redacted like
    /// config values from everything the provider says while the call runs, and
    /// are seen by `get-credentials` only (a `handle-security-error` call does not
    /// get them).
    pub async fn get_credentials_with(
        &self,
        runtime: &Runtime,
        request: &types::Request,
        borrowed: &[(String, Secret)],
        budget: Budget,
    ) -> Result<types::Credentials, Error> {
        const FUNCTION: &str = "get-credentials";
        // The budget first: a fetch refused by it never counts as a breaker probe.
        if budget == Budget::Take {
            self.take_fetch_budget().await?;
        }
        self.admit()?;
        let _slot = self.call_slot().await?;
        self.stats.get_credentials.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut warm = self.checkout(runtime, FUNCTION, request.subject.as_deref())?;
        let _borrowed_guard = (!borrowed.is_empty()).then(|| {
            let id = self.borrow_ids.fetch_add(1, Ordering::Relaxed);
            self.borrowed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(borrowed.iter().map(|(_, v)| (id, v.clone())));
            BorrowedGuard {
                set: &self.borrowed,
                id,
            }
        });
        if !borrowed.is_empty() {
            // This call's config: the provider's own values, then the borrowed
            // ones (a kept instance gets them afresh every call).
            warm.store.data_mut().config = Arc::new(
                self.settings
                    .iter()
                    .chain(borrowed)
                    .map(|(k, v)| (k.as_str(), v.expose()))
                    .collect(),
            );
        }
        let wit_request = wit::Request::from(request);
        let deadline = warm.deadline.clone();
        let call = async {
            let provider = self.instance(&mut warm).await?;
            let described = self.ensure_described(&provider, &mut warm.store).await?;
            if let Some(misconfigured) = self.schema_error(described) {
                return Ok(Err(misconfigured));
            }
            provider
                .get_credentials(&mut warm.store, &wit_request)
                .await
        };
        let outcome = state::until(&deadline, call).await;
        // The state is released as soon as the call ends, however it ended.
        let dead_holder = warm
            .store
            .data_mut()
            .state
            .finish(matches!(outcome, Ok(Ok(_))));
        let captured = &warm.captured;
        let settled = self.settle(FUNCTION, outcome, captured);
        // A provider error the guest returned is a clean finish, unless it was
        // how the guest reported a limit it hit.
        let clean = settled.is_ok() && captured.hits.get().is_none();
        let result = match settled {
            Err(e) => Err(e),
            Ok(Err(error)) => match captured.hits.get() {
                // The guest turned a limit it hit into an error of its own.
                Some((kind, detail)) => Err(self.limit(FUNCTION, kind, detail)),
                None => {
                    let error = types::ProviderError::from(error)
                        .map_message(|m| self.call_redactor(None).redact(&m).into_owned());
                    Err(Error::Provider {
                        provider: self.name.to_string(),
                        error: match (error, &dead_holder) {
                            (types::ProviderError::Denied(m), Some(dead)) => {
                                types::ProviderError::Denied(format!(
                                    "{m} (process {} {} while it held this provider's state{}: a refresh token it had already rotated at the identity provider was lost with it)",
                                    dead.pid,
                                    if dead.aborted {
                                        "had a call cut off (timeout or fault)"
                                    } else {
                                        "died"
                                    },
                                    dead.since
                                        .map(|t| format!(", since {}", crate::clock::rfc3339(t)))
                                        .unwrap_or_default()
                                ))
                            }
                            (error, _) => error,
                        },
                    })
                }
            },
            Ok(Ok(credentials)) => {
                bindings::credentials_from_guest(credentials, self.limits.max_credential_bytes)
                    .map_err(|violation| match violation {
                        bindings::Violation::TooLarge(size) => self.limit(
                            FUNCTION,
                            LimitKind::CredentialSize,
                            format!(
                                "returned a {size}-byte credential; at most {} bytes are allowed",
                                self.limits.max_credential_bytes
                            ),
                        ),
                        bindings::Violation::Invalid(why) => Error::Plugin {
                            provider: self.name.to_string(),
                            function: FUNCTION,
                            source: format!("returned an invalid credential: {why}").into(),
                        },
                    })
            }
        };
        self.log_output(FUNCTION, captured, result.as_ref().ok(), result.is_err());
        self.account(runtime, &warm);
        self.checkin(warm, clean);
        self.book(FUNCTION, &result);
        self.track_health(&result);
        tracing::debug!(provider = %self.name, elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "get-credentials done");
        result
    }

    /// Call `handle-security-error`, in a fresh instance (or, with
    /// `instances.reuse`, one kept for the same subject).
    pub async fn handle_security_error(
        &self,
        runtime: &Runtime,
        request: &types::Request,
        credentials: &types::Credentials,
        error: &types::SecurityError,
    ) -> Result<types::Decision, Error> {
        const FUNCTION: &str = "handle-security-error";
        self.admit()?;
        let _slot = self.call_slot().await?;
        self.stats
            .handle_security_error
            .fetch_add(1, Ordering::Relaxed);
        let mut warm = self.checkout(runtime, FUNCTION, request.subject.as_deref())?;
        let wit_request = wit::Request::from(request);
        let deadline = warm.deadline.clone();
        let wit_credentials = wit::Credentials::from(credentials);
        let wit_error = wit::SecurityError::from(error);
        let call = async {
            let provider = self.instance(&mut warm).await?;
            self.ensure_described(&provider, &mut warm.store).await?;
            provider
                .handle_security_error(&mut warm.store, &wit_request, &wit_credentials, &wit_error)
                .await
        };
        let outcome = state::until(&deadline, call).await;
        warm.store
            .data_mut()
            .state
            .finish(matches!(outcome, Ok(Ok(_))));
        let captured = &warm.captured;
        let result = self
            .settle(FUNCTION, outcome, captured)
            .map(types::Decision::from);
        let clean = result.is_ok() && captured.hits.get().is_none();
        self.log_output(FUNCTION, captured, Some(credentials), result.is_err());
        self.account(runtime, &warm);
        self.checkin(warm, clean);
        self.book(FUNCTION, &result);
        result
    }
}

//! Cache semantics on tokio's paused clock: nothing here waits for real time.
#![allow(clippy::arithmetic_side_effects)] // test values are small and fixed

use super::*;
use crate::clock::TokioClock;
use crate::secret::Secret;
use crate::types::ProviderError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

const START: u64 = 1_700_000_000;

fn bearer(token: &str, expires_at: Option<SystemTime>) -> Credentials {
    Credentials {
        credential: Credential::Bearer(Secret::new(token)),
        expires_at,
        principal: None,
    }
}

/// A provider stand-in: counts calls, issues `t<n>` tokens living `lifetime`,
/// takes `delay` to answer, and fails with `fail` while it is set.
#[derive(Clone)]
struct FakeProvider {
    calls: Arc<AtomicUsize>,
    fail: Arc<Mutex<Option<ProviderError>>>,
    reasons: Arc<Mutex<Vec<Reason>>>,
    clock: TokioClock,
    lifetime: Duration,
    delay: Duration,
}

impl FakeProvider {
    fn new(clock: TokioClock, lifetime: Duration) -> Self {
        FakeProvider {
            calls: Arc::default(),
            fail: Arc::default(),
            reasons: Arc::default(),
            clock,
            lifetime,
            delay: Duration::from_millis(10),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn fail_with(&self, error: Option<ProviderError>) {
        *self.fail.lock().unwrap() = error;
    }

    fn fetcher(&self) -> Fetcher {
        let me = self.clone();
        Arc::new(move |request: Request| {
            let me = me.clone();
            Box::pin(async move {
                let n = me.calls.fetch_add(1, Ordering::SeqCst) + 1;
                me.reasons.lock().unwrap().push(request.reason);
                tokio::time::sleep(me.delay).await;
                if let Some(error) = me.fail.lock().unwrap().clone() {
                    return Err(Error::Provider {
                        provider: "fake".into(),
                        error,
                    });
                }
                let subject = request.subject.unwrap_or_default();
                Ok(bearer(
                    &format!("t{n}{subject}"),
                    Some(me.clock.now() + me.lifetime),
                ))
            })
        })
    }
}

fn setup(lifetime: Duration) -> (TokenCache, FakeProvider, Arc<CacheConfig>, TokioClock) {
    let clock = TokioClock::starting_at(UNIX_EPOCH + Duration::from_secs(START));
    let cache = TokenCache::new(Arc::new(clock), 10_000);
    let fake = FakeProvider::new(clock, lifetime);
    (cache, fake, Arc::new(CacheConfig::default()), clock)
}

fn key(subject: Option<&str>) -> CacheKey {
    let request = match subject {
        Some(s) => Request::new().subject(s),
        None => Request::new(),
    };
    CacheKey::new(Arc::from("fake"), &request)
}

fn token(c: &Credentials) -> String {
    match &c.credential {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("{other:?}"),
    }
}

/// Let spawned tasks (background refreshes) run to completion.
async fn settle() {
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (refresh-at, use-until) after issue, for a token living `lifetime` under `s`
/// with jitter draw `unit`.
fn plan(lifetime: Duration, s: &CacheConfig, unit: f64) -> (Duration, Duration) {
    let now = UNIX_EPOCH + Duration::from_secs(START);
    let e = schedule(bearer("a", Some(now + lifetime)), s, now, 1, unit);
    assert!(e.refresh_at <= e.use_until && e.use_until <= e.expires);
    (
        e.refresh_at.duration_since(now).unwrap(),
        e.use_until.duration_since(now).unwrap(),
    )
}

#[test]
fn schedule_applies_window_min_period_buffer_and_short_token_clamps() {
    let secs = Duration::from_secs;
    let s = CacheConfig::default();
    // 1 h token: window 0.8 + 0.05 × unit; used until 30 s before expiry.
    assert_eq!(plan(secs(3600), &s, 0.0), (secs(2880), secs(3570)));
    assert_eq!(plan(secs(3600), &s, 1.0).0, secs(3060));
    // min_period: never sooner than 60 s after issue.
    let early = CacheConfig {
        window_factor: 0.5,
        buffer_secs: 10,
        ..CacheConfig::default()
    };
    assert_eq!(plan(secs(100), &early, 0.0).0, secs(60));
    // buffer: never later than 300 s before expiry.
    let late = CacheConfig {
        window_factor: 0.95,
        window_jitter: 0.0,
        ..CacheConfig::default()
    };
    assert_eq!(plan(secs(1000), &late, 0.0).0, secs(700));
    // A 5 s token: the clamps do not fit, so only the window applies; it is
    // refreshed ahead and used until 4.5 s.
    assert_eq!(
        plan(secs(5), &s, 0.5),
        (Duration::from_millis(4125), Duration::from_millis(4500))
    );
}

#[test]
fn jitter_spreads_refreshes_of_many_keys_within_the_window() {
    let now = UNIX_EPOCH + Duration::from_secs(START);
    let s = CacheConfig::default();
    let mut times: Vec<Duration> = (0..1000)
        .map(|_| {
            let e = schedule(
                bearer("a", Some(now + Duration::from_secs(3600))),
                &s,
                now,
                1,
                rand::random(),
            );
            e.refresh_at.duration_since(now).unwrap()
        })
        .collect();
    assert!(
        times
            .iter()
            .all(|t| *t >= Duration::from_secs(2880) && *t <= Duration::from_secs(3060))
    );
    times.sort();
    times.dedup();
    assert!(
        times.len() > 900,
        "only {} distinct refresh times",
        times.len()
    );
    let spread = *times.last().unwrap() - times[0];
    assert!(spread > Duration::from_secs(150), "{spread:?}");
}

#[test]
fn backoff_grows_exponentially_and_is_capped() {
    let s = CacheConfig::default();
    let ms = |f| backoff(&s, f, 0.5).as_millis();
    assert_eq!((ms(1), ms(2), ms(3), ms(4)), (100, 200, 400, 800));
    assert_eq!(ms(8), 10_000);
    assert_eq!(ms(50), 10_000);
    assert_eq!(backoff(&s, 1, 0.0).as_millis(), 80);
    assert_eq!(backoff(&s, 1, 0.999).as_millis(), 119);
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_happens_in_the_background_once() {
    let (cache, fake, s, _clock) = setup(Duration::from_secs(3600));
    let (k, f) = (key(None), fake.fetcher());
    let (c, how) = cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    assert_eq!(
        (token(&c), how),
        ("t1".into(), Lookup::Fetched(Reason::Initial))
    );
    let refresh_at = cache.refresh_at(&k.as_ref()).unwrap();
    // Just before the window: no refresh.
    tokio::time::advance(Duration::from_secs(2879)).await;
    cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    settle().await;
    assert_eq!(fake.calls(), 1);
    // In the window: callers keep getting t1 while exactly one refresh runs.
    let until = refresh_at.duration_since(_clock.now()).unwrap_or_default();
    tokio::time::advance(until + Duration::from_millis(1)).await;
    for _ in 0..50 {
        let (c, how) = cache
            .get(&k.as_ref(), &Request::new(), &s, &f)
            .await
            .unwrap();
        assert_eq!((token(&c), how), ("t1".into(), Lookup::Hit));
    }
    settle().await;
    assert_eq!(fake.calls(), 2);
    assert_eq!(fake.reasons.lock().unwrap()[1], Reason::RefreshAhead);
    let (c, how) = cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    assert_eq!((token(&c), how), ("t2".into(), Lookup::Hit));
}

#[tokio::test(start_paused = true)]
async fn advisory_failure_keeps_the_old_credential_until_the_mandatory_window() {
    let (cache, fake, s, clock) = setup(Duration::from_secs(600));
    let (k, f) = (key(None), fake.fetcher());
    cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    fake.fail_with(Some(ProviderError::unavailable("idp down")));
    // Advisory window: the refresh fails, t1 keeps being served, with backoff.
    let refresh_at = cache.refresh_at(&k.as_ref()).unwrap();
    tokio::time::advance(
        refresh_at.duration_since(clock.now()).unwrap() + Duration::from_millis(1),
    )
    .await;
    // 50 callers over 2.5 s: backoff (100, 200, 400, 800 ms …) allows a handful of
    // background attempts, not 50.
    for _ in 0..50 {
        let (c, how) = cache
            .get(&k.as_ref(), &Request::new(), &s, &f)
            .await
            .unwrap();
        assert_eq!((token(&c), how), ("t1".into(), Lookup::Hit));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls_in_advisory = fake.calls() - 1;
    assert!(
        (2..=6).contains(&calls_in_advisory),
        "{calls_in_advisory} refresh attempts"
    );
    assert!(cache.stats(&k.as_ref()).failures >= 1);
    // Mandatory window, token past its use-until time but not expired, IdP still
    // down: stale-if-error serves it.
    let use_until = cache.use_until(&k.as_ref()).unwrap();
    tokio::time::advance(use_until.duration_since(clock.now()).unwrap() + Duration::from_secs(11))
        .await;
    let (c, how) = cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    assert_eq!((token(&c), how), ("t1".into(), Lookup::Stale));
    // Expired: 100 callers block on one fetch and all get its error.
    tokio::time::advance(Duration::from_secs(120)).await;
    let before = fake.calls();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (cache, k, s, f) = (cache.clone(), k.clone(), s.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            cache.get(&k.as_ref(), &Request::new(), &s, &f).await
        }));
    }
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(
            e.provider_error(),
            Some(&ProviderError::unavailable("idp down"))
        );
    }
    assert_eq!(fake.calls() - before, 1);
    // The IdP comes back: after the backoff, one fetch succeeds.
    fake.fail_with(None);
    tokio::time::advance(Duration::from_secs(11)).await;
    let (c, how) = cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    assert_eq!(how, Lookup::Fetched(Reason::Expired));
    assert_ne!(token(&c), "t1");
}

#[tokio::test(start_paused = true)]
async fn herd_of_10000_callers_on_an_expired_key_makes_one_plugin_call() {
    let (cache, fake, s, _) = setup(Duration::from_secs(60));
    let (k, f) = (key(None), fake.fetcher());
    cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    let mut tasks = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let (cache, k, s, f) = (cache.clone(), k.clone(), s.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            token(
                &cache
                    .get(&k.as_ref(), &Request::new(), &s, &f)
                    .await
                    .unwrap()
                    .0,
            )
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), "t2");
    }
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn burst_of_1000_security_errors_with_the_old_credential_refreshes_once() {
    let (cache, fake, s, _) = setup(Duration::from_secs(3600));
    let (k, f) = (key(None), fake.fetcher());
    let (old, _) = cache
        .get(&k.as_ref(), &Request::new(), &s, &f)
        .await
        .unwrap();
    let mut events = cache.subscribe();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (cache, k, s, f, old) = (cache.clone(), k.clone(), s.clone(), f.clone(), old.clone());
        tasks.push(tokio::spawn(async move {
            let dropped =
                cache.invalidate_if(&k.as_ref(), &old, Duration::ZERO) == Invalidation::Dropped;
            let retry = Request {
                reason: Reason::AfterSecurityError,
                ..Request::new()
            };
            let (c, _) = cache.get(&k.as_ref(), &retry, &s, &f).await.unwrap();
            (dropped, token(&c))
        }));
    }
    let mut dropped = 0;
    for t in tasks {
        let (d, t) = t.await.unwrap();
        dropped += usize::from(d);
        assert_eq!(t, "t2");
    }
    assert_eq!(dropped, 1);
    assert_eq!(fake.calls(), 2);
    assert_eq!(fake.reasons.lock().unwrap()[1], Reason::AfterSecurityError);
    assert_eq!(
        events.recv().await.unwrap(),
        CacheEvent::Invalidated {
            key: k.clone(),
            generation: 1
        }
    );
    assert_eq!(
        events.recv().await.unwrap(),
        CacheEvent::Rotated {
            key: k,
            generation: 2,
            reason: Reason::AfterSecurityError
        }
    );
}

#[tokio::test(start_paused = true)]
async fn subjects_are_isolated() {
    let (cache, fake, s, _) = setup(Duration::from_secs(3600));
    let f = fake.fetcher();
    let alice = Request::new().subject("alice");
    let bob = Request::new().subject("bob");
    let (a, _) = cache
        .get(&key(Some("alice")).as_ref(), &alice, &s, &f)
        .await
        .unwrap();
    let (b, _) = cache
        .get(&key(Some("bob")).as_ref(), &bob, &s, &f)
        .await
        .unwrap();
    assert_eq!((token(&a), token(&b)), ("t1alice".into(), "t2bob".into()));
    // Alice's credential is rejected and her IdP account is broken: Bob is unaffected.
    assert_eq!(
        cache.invalidate_if(&key(Some("alice")).as_ref(), &a, Duration::ZERO),
        Invalidation::Dropped
    );
    assert_eq!(
        cache.invalidate_if(&key(Some("bob")).as_ref(), &a, Duration::ZERO),
        Invalidation::NotCurrent
    );
    fake.fail_with(Some(ProviderError::Denied("alice revoked".into())));
    assert!(
        cache
            .get(&key(Some("alice")).as_ref(), &alice, &s, &f)
            .await
            .is_err()
    );
    let (b2, how) = cache
        .get(&key(Some("bob")).as_ref(), &bob, &s, &f)
        .await
        .unwrap();
    assert_eq!((token(&b2), how), ("t2bob".into(), Lookup::Hit));
}

#[tokio::test(start_paused = true)]
async fn denied_is_not_retried_hot() {
    let (cache, fake, s, _) = setup(Duration::from_secs(3600));
    let (k, f) = (key(None), fake.fetcher());
    fake.fail_with(Some(ProviderError::Denied("invalid_client".into())));
    for _ in 0..20 {
        let e = cache
            .get(&k.as_ref(), &Request::new(), &s, &f)
            .await
            .unwrap_err();
        assert!(e.is_permanent());
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.calls(), 1, "denied was retried within the backoff");
    fake.fail_with(None);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        cache
            .get(&k.as_ref(), &Request::new(), &s, &f)
            .await
            .is_ok()
    );
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_exponentially() {
    let (cache, fake, s, _) = setup(Duration::from_secs(3600));
    let (k, f) = (key(None), fake.fetcher());
    fake.fail_with(Some(ProviderError::unavailable("503")));
    // Hammer the key every 10 ms for 5 s: backoff 100, 200, 400, 800, 1600 ms …
    // allows ~6 attempts, not 500.
    for _ in 0..500 {
        let _ = cache.get(&k.as_ref(), &Request::new(), &s, &f).await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let calls = fake.calls();
    assert!((4..=9).contains(&calls), "{calls} calls in 5 s");
    assert_eq!(cache.stats(&k.as_ref()).failures as usize, calls);
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_evicted_when_full() {
    let clock = TokioClock::starting_at(UNIX_EPOCH + Duration::from_secs(START));
    let cache = TokenCache::new(Arc::new(clock), 100);
    let fake = FakeProvider::new(clock, Duration::from_secs(3600));
    let (s, f) = (Arc::new(CacheConfig::default()), fake.fetcher());
    let mut events = cache.subscribe();
    for i in 0..300 {
        let subject = format!("user-{i}");
        let r = Request::new().subject(&subject);
        cache
            .get(&key(Some(&subject)).as_ref(), &r, &s, &f)
            .await
            .unwrap();
    }
    assert!(cache.len() <= 100, "{} keys", cache.len());
    let mut evicted = 0;
    while let Ok(e) = events.try_recv() {
        if matches!(e, CacheEvent::Evicted { .. }) {
            evicted += 1;
        }
    }
    assert!(evicted >= 200, "{evicted}");
    // The most recent key survived.
    assert!(cache.use_until(&key(Some("user-299")).as_ref()).is_some());
}

#[test]
fn borrowed_keys_find_owned_keys_whatever_the_scope_order() {
    use std::hash::BuildHasher;
    let provider: Arc<str> = Arc::from("p");
    let hasher = hashbrown::DefaultHashBuilder::default();
    let sorted = Request::new().scope("a").scope("b").subject("s");
    let unsorted = Request::new().scope("b").scope("a").scope("b").subject("s");
    let owned = CacheKey::new(provider.clone(), &unsorted);
    assert_eq!(owned.scopes, vec!["a".to_string(), "b".to_string()]);
    for request in [&sorted, &unsorted] {
        let borrowed = KeyRef::new(&provider, request);
        assert!(borrowed.equivalent(&owned));
        assert_eq!(hasher.hash_one(&borrowed), hasher.hash_one(&owned));
    }
    let other = Request::new().scope("a").subject("s");
    assert!(!KeyRef::new(&provider, &other).equivalent(&owned));
}

/// A fetcher that returns the credentials `make` builds for the n-th call (from 0).
fn fixed(make: impl Fn(usize) -> Credentials + Send + Sync + 'static) -> Fetcher {
    let calls = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    Arc::new(move |_request: Request| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let make = make.clone();
        Box::pin(async move { Ok(make(n)) })
    })
}

fn jwt(payload: &str) -> String {
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
    format!("eyJhbGciOiJub25lIn0.{body}.sig")
}

/// Regression (hardening review, item 1): a bearer JWT with `exp` = 2^64−1 and no
/// `expires-at` panicked the host ("overflow when adding duration to instant").
#[tokio::test(start_paused = true)]
async fn a_jwt_exp_of_u64_max_is_the_far_future_not_a_panic() {
    let (cache, _fake, settings, _clock) = setup(Duration::from_secs(60));
    let token = jwt(r#"{"exp":18446744073709551615}"#);
    let t = token.clone();
    let fetch = fixed(move |_| bearer(&t, None));
    let k = key(None);
    let (c, lookup) = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap();
    assert_eq!(lookup, Lookup::Fetched(Reason::Initial));
    assert_eq!(c.expires_at, Some(crate::clock::far_future()));
    // Served from the cache afterwards.
    let (_, lookup) = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap();
    assert_eq!(lookup, Lookup::Hit);
    // Every extreme the configuration allows schedules without panicking.
    let extreme = extreme_settings();
    let now = UNIX_EPOCH + Duration::from_secs(START);
    for c in [
        bearer("opaque", None),
        bearer(&token, None),
        bearer("opaque", Some(crate::clock::far_future())),
    ] {
        let e = schedule(c, &extreme, now, 1, 0.99);
        assert!(e.refresh_at <= e.use_until && e.use_until <= e.expires);
    }
}

/// Regression (item 9): an already-expired credential (expires-at in 1970) was
/// handed out.
#[tokio::test(start_paused = true)]
async fn an_already_expired_credential_is_refused_not_handed_out() {
    let (cache, _fake, settings, _clock) = setup(Duration::from_secs(60));
    let fetch = fixed(|_| bearer("old", Some(UNIX_EPOCH + Duration::from_secs(1))));
    let err = cache
        .get(&key(None).as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Contract { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(cache.stats(&key(None).as_ref()).failures, 1);
}

/// Regression (item 9): a provider that computes `expires-at` from `expires_in` on
/// arrival is later than the JWT's own `exp`; the host used the later one and
/// handed tokens out past their `exp`. The earlier of the two wins, and a token
/// whose `exp` passed is refused whatever its `expires-at` says.
#[tokio::test(start_paused = true)]
async fn the_earlier_of_expires_at_and_the_jwt_exp_wins() {
    let (cache, _fake, settings, clock) = setup(Duration::from_secs(60));
    let now = clock.now();
    let exp = START + 100;
    let token = jwt(&format!(r#"{{"exp":{exp}}}"#));
    let t = token.clone();
    let fetch = fixed(move |_| bearer(&t, Some(now + Duration::from_millis(100_500))));
    let (c, _) = cache
        .get(&key(None).as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap();
    assert_eq!(c.expires_at, Some(UNIX_EPOCH + Duration::from_secs(exp)));
    assert!(cache.use_until(&key(None).as_ref()).unwrap() <= UNIX_EPOCH + Duration::from_secs(exp));

    let stale = jwt(r#"{"exp":1000}"#);
    let fetch = fixed(move |_| bearer(&stale, Some(now + Duration::from_secs(3600))));
    let err = cache
        .get(
            &key(Some("other")).as_ref(),
            &Request::new().subject("other"),
            &settings,
            &fetch,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Contract { .. }), "{err}");
}

/// Regression (item 12): a refresh returning another principal for the same key
/// was served silently.
#[tokio::test(start_paused = true)]
async fn a_provider_switching_principal_for_a_key_is_refused_unless_allowed() {
    let (cache, _fake, settings, clock) = setup(Duration::from_secs(60));
    let now = clock.now();
    let make = move |n: usize| Credentials {
        principal: Some(format!("user-{n}")),
        ..bearer(&format!("t{n}"), Some(now + Duration::from_secs(3600)))
    };
    let k = key(None);
    let fetch = fixed(make);
    let (first, _) = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap();
    assert_eq!(
        cache.invalidate_if(&k.as_ref(), &first, Duration::ZERO),
        Invalidation::Dropped
    );
    let err = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Contract { .. }), "{err}");
    assert!(err.to_string().contains("another principal"), "{err}");
    assert!(
        !err.to_string().contains("user-1"),
        "plugin-controlled text echoed: {err}"
    );

    // Opted out: the new principal is accepted.
    let (cache, _fake, _, _) = setup(Duration::from_secs(60));
    let allowing = Arc::new(CacheConfig {
        allow_principal_change: true,
        ..CacheConfig::default()
    });
    let fetch = fixed(make);
    let (first, _) = cache
        .get(&k.as_ref(), &Request::new(), &allowing, &fetch)
        .await
        .unwrap();
    cache.invalidate_if(&k.as_ref(), &first, Duration::ZERO);
    let (second, _) = cache
        .get(&k.as_ref(), &Request::new(), &allowing, &fetch)
        .await
        .unwrap();
    assert_eq!(second.principal.as_deref(), Some("user-1"));
}

/// A client reporting rejections in a loop (hardening review, item 15: a
/// misfiring adapter) cannot force more than one refresh per key per
/// `cache.min_reauth_interval_ms`; compare-and-invalidate applies on top.
#[tokio::test(start_paused = true)]
async fn forced_refreshes_are_limited_per_key() {
    let (cache, fake, settings, _clock) = setup(Duration::from_secs(3600));
    let fetch = fake.fetcher();
    let k = key(None);
    let interval = Duration::from_secs(5);
    let mut current = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap()
        .0;
    assert_eq!(
        cache.invalidate_if(&k.as_ref(), &current, interval),
        Invalidation::Dropped
    );
    current = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap()
        .0;
    // Reported again at once: ignored, the current credential stays.
    for _ in 0..100 {
        assert_eq!(
            cache.invalidate_if(&k.as_ref(), &current, interval),
            Invalidation::Suppressed
        );
        let (again, lookup) = cache
            .get(&k.as_ref(), &Request::new(), &settings, &fetch)
            .await
            .unwrap();
        assert_eq!((token(&again), lookup), (token(&current), Lookup::Hit));
    }
    assert_eq!(fake.calls(), 2);
    tokio::time::advance(interval).await;
    assert_eq!(
        cache.invalidate_if(&k.as_ref(), &current, interval),
        Invalidation::Dropped
    );
}

/// The fuzz target's property on a grid of extreme inputs (runs in CI; the fuzz
/// target explores further): no panic, never served past a known expiry.
#[test]
fn accept_holds_its_invariants_for_extreme_expiries() {
    let exps = [
        "0",
        "1",
        "-1",
        "1e300",
        "\"soon\"",
        "null",
        "9223372036854775807",
        "18446744073709551615",
        "253402300799",
        "253402300800",
    ];
    let expires = [
        None,
        Some(UNIX_EPOCH),
        Some(UNIX_EPOCH + Duration::from_secs(START)),
        Some(crate::clock::far_future()),
    ];
    let nows = [
        UNIX_EPOCH,
        UNIX_EPOCH + Duration::from_secs(START),
        crate::clock::far_future(),
    ];
    for exp in exps {
        let token = jwt(&format!(r#"{{"exp":{exp}}}"#));
        for expires_at in expires {
            for now in nows {
                fuzz_accept(&bearer(&token, expires_at), now);
                fuzz_accept(&bearer("opaque", expires_at), now);
            }
        }
    }
}

/// Review finding: a call refused by the provider's bulkhead (`Error::Busy`)
/// never reached the plugin; it must not back the key off or be replayed.
#[tokio::test(start_paused = true)]
async fn a_busy_refusal_is_not_a_failure_of_the_key() {
    let (cache, _fake, settings, _clock) = setup(Duration::from_secs(60));
    let busy: Fetcher = Arc::new(|_request: Request| {
        Box::pin(async {
            Err(Error::Busy {
                provider: "fake".into(),
                max_concurrent_calls: 1,
                waited_ms: 5,
            })
        })
    });
    let k = key(None);
    let err = cache
        .get(&k.as_ref(), &Request::new(), &settings, &busy)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Busy { .. }));
    assert_eq!(cache.stats(&k.as_ref()).failures, 0);
    // The next lookup calls the provider again (no backoff, no replayed error).
    let fetch = fixed(|_| {
        bearer(
            "fresh",
            Some(UNIX_EPOCH + Duration::from_secs(START + 3600)),
        )
    });
    let (c, lookup) = cache
        .get(&k.as_ref(), &Request::new(), &settings, &fetch)
        .await
        .unwrap();
    assert_eq!(
        (token(&c).as_str(), lookup),
        ("fresh", Lookup::Fetched(Reason::Initial))
    );
}

#[test]
fn failure_delay_is_capped_during_an_outage_and_honours_retry_after() {
    let s = CacheConfig::default();
    let down = Error::Provider {
        provider: "p".into(),
        error: ProviderError::unavailable("connection refused"),
    };
    for failures in [1, 5, 10, 30, u32::MAX] {
        for unit in [0.0, 0.5, 0.999] {
            // Nothing to serve: never more than outage_retry_ms (1 s), at least 90 %
            // of it once the backoff has grown past it.
            let d = failure_delay(&s, &down, failures, false, unit);
            assert!(d <= Duration::from_millis(1000), "{failures}: {d:?}");
            if failures >= 5 {
                assert!(d >= Duration::from_millis(900), "{failures}: {d:?}");
            }
            // A still-valid credential is served: the backoff grows to the maximum.
            let serving = failure_delay(&s, &down, failures, true, unit);
            assert_eq!(serving, backoff(&s, failures, unit));
        }
    }
    assert_eq!(
        failure_delay(&s, &down, 30, true, 0.5),
        Duration::from_millis(s.backoff_max_ms)
    );
    // The IdP's own Retry-After wins, bounded by backoff_max_ms, at any extreme.
    let throttled = |after: Duration| Error::Provider {
        provider: "p".into(),
        error: ProviderError::Unavailable {
            message: "429".into(),
            retry_after: Some(after),
        },
    };
    assert_eq!(
        failure_delay(&s, &throttled(Duration::from_secs(7)), 1, false, 0.5),
        Duration::from_secs(7)
    );
    assert_eq!(
        failure_delay(&s, &throttled(Duration::from_secs(60)), 1, false, 0.5),
        Duration::from_secs(60),
        "a Retry-After past backoff_max_ms is honoured"
    );
    assert_eq!(
        failure_delay(&s, &throttled(Duration::MAX), 1, false, 0.5),
        MAX_IDP_RETRY_AFTER
    );
    // `Retry-After: 0` does not turn the backoff off.
    assert_eq!(
        failure_delay(&s, &throttled(Duration::ZERO), 3, true, 0.5),
        backoff(&s, 3, 0.5)
    );
    assert!(
        failure_delay(&s, &throttled(Duration::ZERO), 9, false, 0.5) >= Duration::from_millis(900)
    );
    // Denied is not an outage: the maximum at once.
    let denied = Error::Provider {
        provider: "p".into(),
        error: ProviderError::Denied("bad secret".into()),
    };
    assert_eq!(
        failure_delay(&s, &denied, 1, false, 0.5),
        Duration::from_millis(s.backoff_max_ms)
    );
    // 0 turns the cap off.
    let uncapped = CacheConfig {
        outage_retry_ms: 0,
        ..CacheConfig::default()
    };
    assert_eq!(
        failure_delay(&uncapped, &down, 30, false, 0.5),
        Duration::from_millis(s.backoff_max_ms)
    );
}

#[tokio::test(start_paused = true)]
async fn callers_recover_within_a_second_of_the_idp_and_the_outage_costs_one_call_a_second() {
    let (cache, fake, s, _) = setup(Duration::from_secs(3600));
    let (k, f) = (key(None), fake.fetcher());
    fake.fail_with(Some(ProviderError::unavailable("connection refused")));
    // A 60 s outage, callers asking every 10 ms.
    for _ in 0..6000 {
        let _ = cache.get(&k.as_ref(), &Request::new(), &s, &f).await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let during = fake.calls();
    // 100, 200, 400 ms steps, then one attempt per 0.9–1 s: about 62, never 6000.
    assert!(
        (55..=70).contains(&during),
        "{during} calls in a 60 s outage"
    );
    // The IdP is back: the first caller served within a second.
    fake.fail_with(None);
    let back = tokio::time::Instant::now();
    loop {
        if cache
            .get(&k.as_ref(), &Request::new(), &s, &f)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            back.elapsed() <= Duration::from_millis(1100),
            "not recovered"
        );
    }
    assert!(
        back.elapsed() <= Duration::from_millis(1010),
        "{:?}",
        back.elapsed()
    );
}

/// A clock whose coarse reading lags its precise one by just under the allowed
/// [`crate::clock::COARSE_LAG`].
#[derive(Clone, Copy)]
struct LaggingCoarse(TokioClock);

impl Clock for LaggingCoarse {
    fn now(&self) -> SystemTime {
        self.0.now()
    }
    fn now_coarse(&self) -> SystemTime {
        self.0.now() - (crate::clock::COARSE_LAG - Duration::from_millis(1))
    }
}

/// The hit path reads the cheap coarse clock, but never serves a hit at or past
/// the refresh time because of its lag: near it, the precise clock decides.
#[tokio::test(start_paused = true)]
async fn a_lagging_coarse_clock_never_serves_a_hit_past_the_refresh_time() {
    let clock = TokioClock::starting_at(UNIX_EPOCH + Duration::from_secs(START));
    let cache = TokenCache::new(Arc::new(LaggingCoarse(clock)), 100);
    let fake = FakeProvider::new(clock, Duration::from_secs(3600));
    let settings = Arc::new(CacheConfig {
        window_jitter: 0.0,
        ..CacheConfig::default()
    });
    let k = key(None);
    cache
        .get(&k.as_ref(), &Request::new(), &settings, &fake.fetcher())
        .await
        .unwrap();
    let refresh_at = cache.refresh_at(&k.as_ref()).unwrap();
    let until = refresh_at.duration_since(clock.now()).unwrap();
    tokio::time::advance(until - Duration::from_millis(1)).await;
    assert!(cache.fresh_hit(&k.as_ref()).is_some(), "1 ms before: a hit");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        cache.fresh_hit(&k.as_ref()).is_none(),
        "at the refresh time the coarse clock still reads before it; the hit path must not trust it"
    );
}

/// A replaced or dropped credential is not kept alive by the hit path's
/// published entry once nobody reads it (it is freed, and wiped, then): the
/// map's collector reclaims one retirement at a time.
#[tokio::test(start_paused = true)]
async fn a_dropped_credential_is_freed_once_nobody_reads_it() {
    let (cache, fake, settings, _clock) = setup(Duration::from_secs(3600));
    let fetch = fake.fetcher();
    let request = Request::new().subject("u");
    let k = key(Some("u"));
    let key = k.as_ref();
    let (first, _) = cache.get(&key, &request, &settings, &fetch).await.unwrap();
    // A hit hands out the published entry's copy.
    let hit = cache.fresh_hit(&key).expect("a fresh hit");
    let (weak_first, weak_hit) = (Arc::downgrade(&first), Arc::downgrade(&hit));
    drop((first, hit));
    assert!(
        weak_first.upgrade().is_some(),
        "the cache holds the credential"
    );
    assert!(cache.drop_if(&key, |_| true));
    let (first, hit) = (weak_first, weak_hit);
    assert!(
        first.upgrade().is_none() && hit.upgrade().is_none(),
        "a dropped credential is still alive"
    );
}

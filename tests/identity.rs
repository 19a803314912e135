//! Identity against the real binary: token issue and validation, forged and expired tokens,
//! password changes and revocation, login throttling, the `user` command line, account info,
//! route roles and the signing secret.

mod common;
use common::*;

use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The signing secret as Tollgate uses it (the trimmed file content, as bytes).
fn secret_of(t: &Tollgate) -> Vec<u8> {
    std::fs::read_to_string(t.dir.path().join("store/jwt-secret"))
        .expect("store/jwt-secret")
        .trim()
        .as_bytes()
        .to_vec()
}

fn json_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("a JWT has three parts");
    serde_json::from_slice(&B64.decode(part).expect("base64url")).expect("JSON")
}

fn sign(alg: Algorithm, kid: &str, claims: &Value, secret: &[u8]) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn login(t: &Tollgate, body: &Value) -> reqwest::blocking::Response {
    client()
        .post(t.url("/account/token/generation"))
        .json(body)
        .send()
        .unwrap()
}

fn login_raw(t: &Tollgate, body: &'static [u8]) -> reqwest::blocking::Response {
    client()
        .post(t.url("/account/token/generation"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap()
}

fn validate(t: &Tollgate, token: &str) -> (u16, Value) {
    let r = client()
        .post(t.url("/account/token/validation"))
        .json(&json!(token))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// A proxied call (the demo echo route) with this token.
fn proxied(t: &Tollgate, token: &str) -> reqwest::blocking::Response {
    t.post_json("/demo/echo", token, &json!({"hello": "world"}))
}

/// 401 in the API shape on a proxied route and on /account/info and /account/quota.
fn assert_refused_everywhere(t: &Tollgate, token: &str, what: &str) {
    // A 401 names the scheme that would be accepted (RFC 9110 11.6.1).
    let challenge = |r: &reqwest::blocking::Response| {
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let r = proxied(t, token);
    assert_eq!(r.status(), 401, "{what}: proxied route");
    assert_eq!(challenge(&r).as_deref(), Some("Bearer"), "{what}");
    assert_error_shape(&r.json().unwrap(), "UNIVERSAL");
    for path in ["/account/info", "/account/quota"] {
        let r = t.get(path, token);
        assert_eq!(r.status(), 401, "{what}: {path}");
        assert_eq!(challenge(&r).as_deref(), Some("Bearer"), "{what}: {path}");
        assert_error_shape(&r.json().unwrap(), "ACCOUNT");
    }
}

fn assert_accepted_everywhere(t: &Tollgate, token: &str, what: &str) {
    assert_eq!(proxied(t, token).status(), 200, "{what}: proxied route");
    assert_eq!(
        t.get("/account/info", token).status(),
        200,
        "{what}: /account/info"
    );
}

#[test]
fn login_returns_a_pinned_hs256_jwt_with_the_users_claims() {
    let t = Tollgate::start();
    let ttl = 3600;
    let before = now_secs();
    let r = login(
        &t,
        &json!({"username": "alice", "password": "alice-password-1", "ttl_seconds": ttl}),
    );
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    // The body is the bare JWT as a JSON string, as the official client expects.
    let token: String = r.json().expect("a JSON string");
    let header = json_part(&token, 0);
    assert_eq!(header["alg"], "HS256", "{header}");
    assert!(
        header["kid"].as_str().is_some_and(|k| !k.is_empty()),
        "{header}"
    );
    let claims = json_part(&token, 1);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["company"], "acme", "{claims}");
    assert_eq!(claims["roles"], json!(["USER"]), "{claims}");
    assert!(claims["ver"].is_u64(), "{claims}");
    let exp = claims["exp"].as_i64().unwrap();
    assert!(
        (exp - (before + ttl)).abs() <= 2,
        "exp {exp} vs now+ttl {}",
        before + ttl
    );

    // The signature verifies with the stored secret, HS256 only.
    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(&secret_of(&t)),
        &validation,
    )
    .expect("signed with the store's secret");

    // Default ttl: 86400.
    let before = now_secs();
    let token: String = login(
        &t,
        &json!({"username": "bob", "password": "bob-password-1"}),
    )
    .json()
    .unwrap();
    let claims = json_part(&token, 1);
    let exp = claims["exp"].as_i64().unwrap();
    assert!(
        (exp - (before + 86_400)).abs() <= 2,
        "default ttl: exp {exp}, now {before}"
    );
    assert_eq!(claims["roles"], json!(["USER"]));

    // The bounds themselves are accepted.
    for ttl in [60, 31_556_926] {
        let r = login(
            &t,
            &json!({"username": "paula", "password": "paula-password-1", "ttl_seconds": ttl}),
        );
        assert_eq!(r.status(), 200, "ttl_seconds {ttl}");
        let exp = json_part(&r.json::<String>().unwrap(), 1)["exp"]
            .as_i64()
            .unwrap();
        assert!((exp - (now_secs() + ttl)).abs() <= 2, "ttl {ttl}");
    }
    assert_eq!(
        json_part(&t.token("root_admin"), 1)["roles"],
        json!(["ADMIN"])
    );
}

#[test]
fn bad_token_requests_are_400s_naming_the_field() {
    let t = Tollgate::start();
    let long_name = "a".repeat(257);
    let long_password = "p".repeat(1001);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "ttl 59",
            json!({"username": "alice", "password": "alice-password-1", "ttl_seconds": 59}),
            "ttl_seconds",
        ),
        (
            "ttl 31556927",
            json!({"username": "alice", "password": "alice-password-1", "ttl_seconds": 31_556_927}),
            "ttl_seconds",
        ),
        (
            "ttl negative",
            json!({"username": "alice", "password": "alice-password-1", "ttl_seconds": -1}),
            "ttl_seconds",
        ),
        (
            "ttl string",
            json!({"username": "alice", "password": "alice-password-1", "ttl_seconds": "60"}),
            "ttl_seconds",
        ),
        (
            "username 1 char",
            json!({"username": "a", "password": "x"}),
            "username",
        ),
        (
            "username 257 chars",
            json!({"username": long_name, "password": "x"}),
            "username",
        ),
        (
            "username a-b",
            json!({"username": "a-b", "password": "x"}),
            "username",
        ),
        (
            "username with space",
            json!({"username": "al ice", "password": "x"}),
            "username",
        ),
        (
            "username a number",
            json!({"username": 5, "password": "x"}),
            "username",
        ),
        (
            "username null",
            json!({"username": null, "password": "x"}),
            "username",
        ),
        (
            "password 1001 chars",
            json!({"username": "alice", "password": long_password}),
            "password",
        ),
        (
            "password empty",
            json!({"username": "alice", "password": ""}),
            "password",
        ),
        (
            "password a number",
            json!({"username": "alice", "password": 12345}),
            "password",
        ),
        ("missing password", json!({"username": "alice"}), "password"),
        ("missing username", json!({"password": "x"}), "username"),
        ("an array", json!(["alice", "x"]), "body"),
        ("a bare JSON string", json!("alice"), "body"),
        (
            "unknown field",
            json!({"username": "alice", "password": "x", "role": "ADMIN"}),
            "role",
        ),
    ];
    for (what, body, field) in cases {
        let r = login(&t, &body);
        assert_eq!(r.status(), 400, "{what}");
        let body: Value = r.json().unwrap();
        assert_error_shape(&body, "ACCOUNT");
        let operation = body["tracedata"]["operation"].as_str().unwrap();
        assert!(operation.contains("token_generation"), "{what}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{what}: message should name {field}: {message}"
        );
    }
    for (what, raw) in [
        ("not JSON", &b"username=alice&password=x"[..]),
        ("empty body", b""),
        ("null", b"null"),
    ] {
        let r = login_raw(&t, raw);
        assert_eq!(r.status(), 400, "{what}");
        let body: Value = r.json().unwrap();
        assert_error_shape(&body, "ACCOUNT");
        assert!(
            body["message"].as_str().unwrap().starts_with("body"),
            "{what}: {body}"
        );
    }
    // The username tried is the client once it is known and well-formed enough.
    let body: Value = login(
        &t,
        &json!({"username": "alice", "password": "alice-password-1", "ttl_seconds": 59}),
    )
    .json()
    .unwrap();
    assert_eq!(body["tracedata"]["client"], "alice");
    let body: Value = login_raw(&t, b"").json().unwrap();
    assert_eq!(body["tracedata"]["client"], "anonymous");
    // A name that is no `\w+` is not echoed: the client reads `client` as one.
    for name in ["!!", "-x", "a b"] {
        let r = login(&t, &json!({"username": name, "password": "x"}));
        assert_eq!(r.status(), 400, "{name}");
        let body: Value = r.json().unwrap();
        assert_eq!(body["tracedata"]["client"], "anonymous", "{name}: {body}");
    }
    // Valid at the edges of the bounds: not a 400 (just unknown users).
    for name in [
        "ab".to_string(),
        "a".repeat(256),
        "under_score_9".to_string(),
    ] {
        assert_eq!(
            login(&t, &json!({"username": name, "password": "x"})).status(),
            401,
            "{name}"
        );
    }
    assert_eq!(
        login(
            &t,
            &json!({"username": "alice", "password": "p".repeat(1000)})
        )
        .status(),
        401
    );
}

#[test]
fn truncated_json_is_a_400_naming_the_body() {
    let t = Tollgate::start();
    for raw in [
        &b"{\"username\": \"alice\", "[..],
        b"{\"username\": \"al",
        b"{",
        // The fields in order, as an array: not a TokenRequest.
        b" [\"alice\", \"alice-password-1\", 3600]",
    ] {
        let r = login_raw(&t, raw);
        assert_eq!(r.status(), 400);
        let body: Value = r.json().unwrap();
        assert_error_shape(&body, "ACCOUNT");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("body"),
            "{}: {message}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn wrong_password_and_unknown_user_get_the_same_answer() {
    let t = Tollgate::start();
    let wrong = login(
        &t,
        &json!({"username": "alice", "password": "not-her-password"}),
    );
    let unknown = login(
        &t,
        &json!({"username": "nobody_here", "password": "not-her-password"}),
    );
    assert_eq!(wrong.status(), 401);
    assert_eq!(unknown.status(), 401);
    assert_eq!(wrong.headers().get("retry-after"), None);
    let (wrong, unknown): (Value, Value) = (wrong.json().unwrap(), unknown.json().unwrap());
    assert_error_shape(&wrong, "ACCOUNT");
    assert_error_shape(&unknown, "ACCOUNT");
    assert_eq!(wrong["message"], unknown["message"]);
    assert_eq!(wrong["tracedata"]["client"], "alice");
    assert_eq!(unknown["tracedata"]["client"], "nobody_here");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.extend(
            v["tracedata"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| format!("tracedata.{k}")),
        );
        k.sort();
        k
    };
    assert_eq!(keys(&wrong), keys(&unknown));
    assert_ne!(wrong["tracedata"]["code"], unknown["tracedata"]["code"]);

    // Their timing is measured by `cargo bench --bench token` (failed_login/*).
}

fn throttled(account: u32, address: u32) -> Tollgate {
    start_with_config_edit(Setup::default(), |config| {
        config
            .replace(
                "login_failures_per_account_per_minute = 1000",
                &format!("login_failures_per_account_per_minute = {account}"),
            )
            .replace(
                "login_failures_per_address_per_minute = 1000",
                &format!("login_failures_per_address_per_minute = {address}"),
            )
    })
}

fn assert_throttled(r: reqwest::blocking::Response, what: &str) -> String {
    assert_eq!(r.status(), 429, "{what}");
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: Retry-After"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{what}: Retry-After {retry}");
    let body: Value = r.json().unwrap();
    assert_error_shape(&body, "ACCOUNT");
    body["message"].as_str().unwrap().to_string()
}

#[test]
fn failed_logins_lock_the_account_after_the_allowance_known_or_not() {
    let t = throttled(3, 1000);
    // A successful login counts nothing.
    let bob = t.token("bob");
    for user in ["bob", "nobody_here"] {
        for i in 0..3 {
            let r = login(
                &t,
                &json!({"username": user, "password": format!("wrong-{i}")}),
            );
            assert_eq!(
                r.status(),
                401,
                "{user}: failure {} is within the allowance",
                i + 1
            );
        }
    }
    // Past the allowance: refused before any password check, even the right one.
    let known = assert_throttled(
        login(
            &t,
            &json!({"username": "bob", "password": "bob-password-1"}),
        ),
        "bob, right password",
    );
    let unknown = assert_throttled(
        login(
            &t,
            &json!({"username": "nobody_here", "password": "whatever"}),
        ),
        "unknown account",
    );
    assert_eq!(
        known, unknown,
        "the answer must not tell whether the account exists"
    );
    assert_throttled(
        login(&t, &json!({"username": "bob", "password": "wrong"})),
        "bob, wrong password",
    );
    // Other accounts from the same address are not affected.
    assert_eq!(
        login(
            &t,
            &json!({"username": "alice", "password": "alice-password-1"})
        )
        .status(),
        200
    );
    // Tokens issued before keep working: the lock is on logging in.
    assert_accepted_everywhere(&t, &bob, "bob's earlier token");
}

#[test]
fn a_lock_lifts_after_retry_after_and_a_refilled_allowance_is_one_guess() {
    // 60 per minute: one failure a second in the long run.
    let t = throttled(60, 100_000);
    let wrong = json!({"username": "bob", "password": "wrong"});
    let mut attempts = 0;
    let retry_after = loop {
        attempts += 1;
        assert!(attempts <= 400, "never locked");
        let r = login(&t, &wrong);
        if r.status() == 429 {
            break r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
        assert_eq!(r.status(), 401);
    };
    assert!(
        attempts > 60,
        "the burst is the allowance: locked after {attempts}"
    );
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    // A client that waits Retry-After seconds gets in.
    let locked_at = Instant::now();
    let right = json!({"username": "bob", "password": "bob-password-1"});
    loop {
        let r = login(&t, &right);
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            locked_at.elapsed() < Duration::from_millis(retry_after * 1000 + 500),
            "still locked after Retry-After"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // One cell has refilled: one more guess, and the lock is back at once.
    assert_eq!(login(&t, &wrong).status(), 401);
    assert_throttled(login(&t, &wrong), "the guess after the refilled one");
}

/// The statuses of `n` calls made side by side, sorted.
fn side_by_side(n: usize, call: impl Fn(usize) -> reqwest::blocking::Response + Sync) -> Vec<u16> {
    let mut statuses: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let call = &call;
                s.spawn(move || call(i).status().as_u16())
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    statuses.sort_unstable();
    statuses
}

#[test]
fn guesses_sent_side_by_side_get_no_more_checks_than_the_allowance() {
    // Each password check takes tens of milliseconds: guesses sent at once must still be
    // judged knowing the failures before them, or a burst checks them all.
    let expected = |allowed: usize, n: usize| {
        let mut statuses = vec![401; allowed];
        statuses.resize(n, 429);
        statuses
    };
    let t = throttled(3, 100_000);
    let on_one_account = side_by_side(24, |i| {
        login(
            &t,
            &json!({"username": "bob", "password": format!("guess-{i}")}),
        )
    });
    assert_eq!(on_one_account, expected(3, 24), "guesses on one account");
    let alice = t.token("alice");
    let through_a_token = side_by_side(12, |i| {
        change_password(&t, &alice, &format!("guess-{i}"), "alice-new-password-2")
    });
    assert_eq!(
        through_a_token,
        expected(3, 12),
        "guesses as current_password"
    );

    let t = throttled(100_000, 3);
    let from_one_address = side_by_side(24, |i| {
        login(
            &t,
            &json!({"username": format!("someone_{i}"), "password": "guess"}),
        )
    });
    assert_eq!(
        from_one_address,
        expected(3, 24),
        "guesses from one address"
    );
}

#[test]
fn failed_logins_lock_the_address_after_the_allowance() {
    let t = throttled(1000, 3);
    for user in ["bob", "nobody_1", "alice"] {
        assert_eq!(
            login(&t, &json!({"username": user, "password": "wrong"})).status(),
            401,
            "{user}"
        );
    }
    let a = assert_throttled(
        login(
            &t,
            &json!({"username": "paula", "password": "paula-password-1"}),
        ),
        "paula from a locked address",
    );
    let b = assert_throttled(
        login(&t, &json!({"username": "nobody_2", "password": "x"})),
        "unknown from a locked address",
    );
    assert_eq!(a, b);
}

#[test]
fn token_validation_answers_valid_and_roles() {
    let t = Tollgate::start();
    let token = t.token("alice");
    let (status, body) = validate(&t, &token);
    assert_eq!(status, 200);
    assert_eq!(body, json!({"valid": true, "roles": ["USER"]}));
    let (_, body) = validate(&t, &t.token("root_admin"));
    assert_eq!(body, json!({"valid": true, "roles": ["ADMIN"]}));
    // The bare token as text is accepted too.
    let r = client()
        .post(t.url("/account/token/validation"))
        .header("content-type", "text/plain")
        .body(token.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().unwrap(),
        json!({"valid": true, "roles": ["USER"]})
    );
    // Garbage is simply not valid.
    for garbage in ["garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.AAAA"] {
        let (status, body) = validate(&t, garbage);
        assert_eq!(status, 200, "{garbage}");
        assert_eq!(body, json!({"valid": false, "roles": []}), "{garbage}");
    }
    // Empty: a 400 naming the rule.
    let (status, body) = validate(&t, "");
    assert_eq!(status, 400);
    assert_error_shape(&body, "ACCOUNT");
    let r = client()
        .post(t.url("/account/token/validation"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400, "empty body");
    assert_error_shape(&r.json().unwrap(), "ACCOUNT");
    let (status, _) = validate(&t, &"x".repeat(1001));
    assert_eq!(status, 400, "over 1000 characters");
}

#[test]
fn forged_foreign_and_expired_tokens_are_refused_everywhere() {
    let t = Tollgate::start();
    let real = t.token("alice");
    let kid = json_part(&real, 0)["kid"].as_str().unwrap().to_string();
    let real_claims = json_part(&real, 1);
    let secret = secret_of(&t);
    let claims = |exp: i64| {
        let mut c = real_claims.clone();
        c["exp"] = json!(exp);
        c
    };
    // A control: a token we sign ourselves with the right secret and kid is accepted, so the
    // refusals below are about the one thing each changes.
    let own = sign(Algorithm::HS256, &kid, &claims(now_secs() + 600), &secret);
    assert_eq!(
        validate(&t, &own).1,
        json!({"valid": true, "roles": ["USER"]})
    );
    assert_accepted_everywhere(&t, &own, "self-signed control");

    let other_key = sign(
        Algorithm::HS256,
        &kid,
        &claims(now_secs() + 600),
        b"another-secret-another-secret-another-secret",
    );
    let hs512 = sign(Algorithm::HS512, &kid, &claims(now_secs() + 600), &secret);
    let none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string()),
        B64.encode(claims(now_secs() + 600).to_string())
    );
    let expired = sign(Algorithm::HS256, &kid, &claims(now_secs() - 5), &secret);
    let mut ghost = claims(now_secs() + 600);
    ghost["sub"] = json!("nobody_here");
    let ghost = sign(Algorithm::HS256, &kid, &ghost, &secret);
    let mut old_version = claims(now_secs() + 600);
    old_version["ver"] = json!(real_claims["ver"].as_u64().unwrap() + 7);
    let old_version = sign(Algorithm::HS256, &kid, &old_version, &secret);
    let no_kid = {
        let header = Header::new(Algorithm::HS256);
        jsonwebtoken::encode(
            &header,
            &claims(now_secs() + 600),
            &EncodingKey::from_secret(&secret),
        )
        .unwrap()
    };
    let mut tampered = real.clone();
    tampered.replace_range(tampered.len() - 3.., "AAA");

    for (what, token) in [
        ("another key", other_key),
        ("HS512 with the same secret", hs512),
        ("alg none", none),
        ("expired", expired),
        ("a user that does not exist", ghost),
        ("another token version", old_version),
        ("no kid", no_kid),
        ("tampered signature", tampered),
    ] {
        let (status, body) = validate(&t, &token);
        assert_eq!(status, 200, "{what}");
        assert_eq!(body, json!({"valid": false, "roles": []}), "{what}");
        assert_refused_everywhere(&t, &token, what);
    }
    // No credentials at all.
    let r = client().get(t.url("/account/info")).send().unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().unwrap();
    assert_error_shape(&body, "ACCOUNT");
    assert_eq!(body["tracedata"]["client"], "anonymous");
    let r = client()
        .post(t.url("/demo/echo"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_error_shape(&r.json().unwrap(), "UNIVERSAL");
    let r = client()
        .get(t.url("/account/info"))
        .header("authorization", format!("Basic {real}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // The scheme's name is case-insensitive.
    for scheme in ["bearer", "BEARER", "bEaReR"] {
        let r = client()
            .get(t.url("/account/info"))
            .header("authorization", format!("{scheme} {real}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
}

#[test]
fn a_token_expires_exactly_at_exp() {
    let t = Tollgate::start();
    let real = t.token("bob");
    let kid = json_part(&real, 0)["kid"].as_str().unwrap().to_string();
    let mut c = json_part(&real, 1);
    let exp = now_secs() + 2;
    c["exp"] = json!(exp);
    let short = sign(Algorithm::HS256, &kid, &c, &secret_of(&t));
    assert_eq!(t.get("/account/info", &short).status(), 200);
    // Poll until the second after exp has begun (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while now_secs() <= exp + 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        t.get("/account/info", &short).status(),
        401,
        "no leeway after exp"
    );
    assert_eq!(validate(&t, &short).1["valid"], false);
}

fn change_password(
    t: &Tollgate,
    token: &str,
    current: &str,
    new: &str,
) -> reqwest::blocking::Response {
    t.post_json(
        "/account/password",
        token,
        &json!({"current_password": current, "new_password": new}),
    )
}

#[test]
fn a_password_change_revokes_every_earlier_token_and_survives_a_restart() {
    let mut t = Tollgate::start();
    let first = t.token("bob");
    // Wrong current password: 401 and nothing changes.
    let r = change_password(&t, &first, "not-the-password", "bob-new-password-2");
    assert_eq!(r.status(), 401);
    assert_error_shape(&r.json().unwrap(), "ACCOUNT");
    assert_accepted_everywhere(&t, &first, "after a refused change");
    assert_eq!(
        login(
            &t,
            &json!({"username": "bob", "password": "bob-new-password-2"})
        )
        .status(),
        401
    );
    // Bad input: 400 naming the field.
    for (body, field) in [
        (
            json!({"current_password": "bob-password-1"}),
            "new_password",
        ),
        (
            json!({"current_password": "bob-password-1", "new_password": ""}),
            "new_password",
        ),
        (
            json!({"current_password": "bob-password-1", "new_password": "n".repeat(1001)}),
            "new_password",
        ),
        (
            json!({"current_password": 1, "new_password": "x"}),
            "current_password",
        ),
    ] {
        let r = t.post_json("/account/password", &first, &body);
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().unwrap();
        assert_error_shape(&v, "ACCOUNT");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
    assert_accepted_everywhere(&t, &first, "after refused changes");
    // No token: 401.
    let r = client()
        .post(t.url("/account/password"))
        .json(&json!({"current_password": "a", "new_password": "b"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);

    let recent = t.token("bob");
    let r = change_password(&t, &recent, "bob-password-1", "bob-new-password-2");
    assert_eq!(r.status(), 200);
    let new_token: String = r.json().expect("the new token as a JSON string");
    assert_accepted_everywhere(&t, &new_token, "the token from the change");
    assert_eq!(
        validate(&t, &new_token).1,
        json!({"valid": true, "roles": ["USER"]})
    );
    for (what, old) in [
        ("the first token", &first),
        ("a token issued just before", &recent),
    ] {
        assert_refused_everywhere(&t, old, what);
        assert_eq!(validate(&t, old).1["valid"], false, "{what}");
    }
    assert_eq!(
        login(
            &t,
            &json!({"username": "bob", "password": "bob-password-1"})
        )
        .status(),
        401,
        "old password"
    );
    let fresh = t.token_for("bob", "bob-new-password-2");
    assert_accepted_everywhere(&t, &fresh, "a login with the new password");
    // Other users are untouched.
    assert_accepted_everywhere(&t, &t.token("alice"), "alice");

    // A restart re-reads the config, which still lists bob's first password: the change stays.
    assert_eq!(t.terminate(), Some(0));
    t.spawn();
    assert_eq!(
        login(
            &t,
            &json!({"username": "bob", "password": "bob-password-1"})
        )
        .status(),
        401,
        "old password after restart"
    );
    assert_accepted_everywhere(
        &t,
        &t.token_for("bob", "bob-new-password-2"),
        "new password after restart",
    );
    assert_accepted_everywhere(&t, &new_token, "the change's token after restart");
    assert_refused_everywhere(&t, &recent, "an old token after restart");
}

#[test]
fn concurrent_account_writes_never_undo_a_password_change() {
    let t = Tollgate::start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Others keep writing their account info (bob) and alice's own (with her first token) while
    // alice changes her password several times.
    let alice_first = t.token("alice");
    let writers: Vec<_> = [("bob", t.token("bob")), ("alice", alice_first.clone())]
        .into_iter()
        .map(|(user, token)| {
            let (url, stop) = (t.url("/account/info"), stop.clone());
            let company = "acme";
            std::thread::spawn(move || {
                let c = client();
                let mut n = 0;
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                    let body = json!({"username": user, "company_key": company, "name": format!("name {n}"), "timezone": 3});
                    let _ = c.put(&url).bearer_auth(&token).json(&body).send();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut password = "alice-password-1".to_string();
    let mut token = alice_first.clone();
    let mut revoked = vec![];
    for i in 0..8 {
        let next = format!("alice-password-round-{i}");
        let r = change_password(&t, &token, &password, &next);
        assert_eq!(r.status(), 200, "change {i}");
        revoked.push(token);
        token = r.json().unwrap();
        password = next;
        assert_eq!(
            t.get("/account/info", &token).status(),
            200,
            "the new token of change {i} must work at once"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(
        writes > 0,
        "no account write ran alongside the password changes"
    );
    for (i, old) in revoked.iter().enumerate() {
        assert_eq!(
            t.get("/account/info", old).status(),
            401,
            "token before change {i} must stay revoked"
        );
    }
    assert_eq!(
        login(
            &t,
            &json!({"username": "alice", "password": "alice-password-1"})
        )
        .status(),
        401
    );
    assert_eq!(
        t.get("/account/info", &t.token_for("alice", &password))
            .status(),
        200
    );
}

#[test]
fn roles_the_config_sets_again_at_a_restart_revoke_the_tokens_issued_under_others() {
    let mut t = Tollgate::start();
    let out = t.user_cli(&["set-roles", "alice", "USER", "PARTNER"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = t.token("alice");
    assert_eq!(validate(&t, &token).1["valid"], true);
    // The same roles in another order are no change.
    let out = t.user_cli(&["set-roles", "alice", "PARTNER", "USER"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(validate(&t, &token).1["valid"], true);
    // The config lists alice as USER only: the start puts that back, and the token that says
    // PARTNER is revoked.
    t.terminate();
    t.spawn();
    assert_eq!(validate(&t, &token).1["valid"], false);
    // Roles the config leaves as they are revoke nothing, at a restart or from the CLI.
    let token = t.token("alice");
    t.terminate();
    t.spawn();
    assert_eq!(validate(&t, &token).1["valid"], true);
    let out = t.user_cli(&["set-roles", "alice", "USER"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(validate(&t, &token).1["valid"], true);
}

#[test]
fn a_removed_user_loses_their_tokens() {
    let mut t = Tollgate::start();
    t.terminate();
    let out = t.user_cli(
        &[
            "add",
            "carol",
            "--company",
            "acme",
            "--password",
            "carol-password-1",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.spawn();
    let token = t.token("carol");
    assert_accepted_everywhere(&t, &token, "carol");
    t.terminate();
    let out = t.user_cli(&["remove", "carol"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("carol"));
    t.spawn();
    assert_refused_everywhere(&t, &token, "a removed user's token");
    assert_eq!(validate(&t, &token).1["valid"], false);
    assert_eq!(
        login(
            &t,
            &json!({"username": "carol", "password": "carol-password-1"})
        )
        .status(),
        401
    );

    // The name stays taken: a config that lists it again is refused at start, naming the key.
    t.terminate();
    let config = std::fs::read_to_string(&t.config_path).unwrap();
    std::fs::write(
        &t.config_path,
        format!(
            "{config}\n[[users]]\nusername = \"carol\"\npassword = \"carol-password-2\"\n\
             company_key = \"acme\"\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&t.config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("tollgate started with a removed user's name in its config");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(!status.success());
    assert!(
        said.contains("users.carol") && said.contains("was removed"),
        "{said}"
    );
}

fn cli_ok(t: &Tollgate, args: &[&str], stdin: Option<&str>) -> String {
    let out = t.user_cli(args, stdin);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A username and a company key each within 256 characters, whose tracedata client label
/// (`company_|_username`) is not.
static LONG_NAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "u".repeat(200));
static LONG_COMPANY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "c".repeat(200));

/// `set-quota dave` for UNIVERSAL/PLAN with one value.
fn plan_quota<'a>(flag: &'a str, value: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "set-quota",
        "dave",
        "--service",
        "UNIVERSAL",
        "--method-group",
        "PLAN",
    ];
    args.extend([flag, value]);
    args
}

#[test]
fn listing_the_users_of_a_store_that_does_not_exist_says_so_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-store");
    let config = std::fs::read_to_string("config/default.toml")
        .unwrap()
        .replace(
            "path = \"../data\"",
            &format!("path = {:?}", missing.display().to_string()),
        );
    assert!(config.contains("no-such-store"), "store.path not replaced");
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["user", "--config"])
        .arg(&config_path)
        .arg("list")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a mistyped store path read as no users"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store.path") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!missing.exists(), "listing created a store");
}

/// Commands that must fail with a clear message, stopped or running.
fn cli_refusals(t: &Tollgate, when: &str) {
    for (args, expect) in [
        (
            vec!["add", "dave", "--company", "acme", "--password", "x"],
            "exists",
        ),
        (vec!["remove", "nobody_here"], "nobody_here"),
        (
            vec!["passwd", "nobody_here", "--password", "x"],
            "nobody_here",
        ),
        (vec!["set-roles", "nobody_here", "ADMIN"], "nobody_here"),
        (vec!["set-roles", "dave", "BOT", "BOT"], "different roles"),
        (
            vec![
                "add",
                "frank",
                "--company",
                "acme",
                "--roles",
                "USER,USER",
                "--password",
                "x",
            ],
            "different roles",
        ),
        (
            vec!["add", "a-b", "--company", "acme", "--password", "x"],
            "username",
        ),
        (
            vec!["add", "frank", "--company", "ac", "--password", "x"],
            "company",
        ),
        (
            vec!["add", "anonymous", "--company", "acme", "--password", "x"],
            "reserved",
        ),
        (
            vec!["add", "frank", "--company", "anonymous", "--password", "x"],
            "reserved",
        ),
        (
            vec![
                "add",
                &LONG_NAME,
                "--company",
                &LONG_COMPANY,
                "--password",
                "x",
            ],
            "company_key_|_username must be at most 256 characters",
        ),
        (
            plan_quota("--max-concurrent-execution", "100000"),
            "max_concurrent_execution: 100000 is out of range 0..=1000",
        ),
        (
            plan_quota("--points-per-request", "99999999999"),
            "points_per_request: 99999999999 is out of range 0..=1000000",
        ),
        (
            vec![
                "add",
                "frank",
                "--company",
                "acme",
                "--roles",
                "KING",
                "--password",
                "x",
            ],
            "KING",
        ),
        (
            vec![
                "add",
                "frank",
                "--company",
                "acme",
                "--timezone",
                "13",
                "--password",
                "x",
            ],
            "timezone",
        ),
        (
            vec!["add", "frank", "--company", "acme", "--password", ""],
            "password",
        ),
        (vec!["set-roles", "dave", "USER,ADMIN,BOT"], "roles"),
    ] {
        let out = t.user_cli(&args, None);
        assert!(!out.status.success(), "{when}: {args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{when}: {args:?}: {err}");
        assert!(
            !err.contains("could not be opened"),
            "{when}: a refusal is said as it is: {err}"
        );
    }
    let list = cli_ok(t, &["list"], None);
    assert!(
        !list.contains("frank"),
        "{when}: refused adds change nothing: {list}"
    );
}

#[test]
fn the_user_command_line_manages_accounts_on_a_stopped_server() {
    let mut t = Tollgate::start();
    t.terminate();
    let said = cli_ok(
        &t,
        &[
            "add",
            "dave",
            "--company",
            "acme",
            "--password",
            "dave-password-1",
            "--timezone",
            "-4",
        ],
        None,
    );
    assert!(
        said.contains("dave") && said.contains("acme"),
        "add prints what it did: {said}"
    );
    let list = cli_ok(&t, &["list"], None);
    assert!(
        list.lines().any(|l| l.starts_with("dave\tacme\tUSER")),
        "{list}"
    );
    assert!(list.lines().any(|l| l.starts_with("alice\t")), "{list}");
    assert!(
        !list.contains("argon2"),
        "list must not print hashes: {list}"
    );
    cli_refusals(&t, "stopped");

    t.spawn();
    let dave = t.token_for("dave", "dave-password-1");
    let info: Value = t.get("/account/info", &dave).json().unwrap();
    assert_eq!(info["timezone"], -4);
    assert_eq!(info["company_key"], "acme");
    t.terminate();

    let said = cli_ok(&t, &["passwd", "dave"], Some("dave-password-2\n"));
    assert!(said.contains("dave"), "{said}");
    cli_ok(&t, &["set-roles", "dave", "PARTNER,BOT"], None);
    t.spawn();
    assert_refused_everywhere(&t, &dave, "dave's token after passwd");
    assert_eq!(
        login(
            &t,
            &json!({"username": "dave", "password": "dave-password-1"})
        )
        .status(),
        401
    );
    let dave = t.token_for("dave", "dave-password-2");
    let (_, v) = validate(&t, &dave);
    assert_eq!(v["valid"], true);
    let mut roles: Vec<String> = serde_json::from_value(v["roles"].clone()).unwrap();
    roles.sort();
    assert_eq!(roles, vec!["BOT", "PARTNER"]);
}

#[test]
fn the_user_command_line_reaches_a_running_server_and_revokes_at_once() {
    use std::os::unix::fs::PermissionsExt;
    let t = Tollgate::start();
    let socket = t.dir.path().join("store/admin.sock");
    let mode = std::fs::metadata(&socket)
        .expect("admin socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");

    let said = cli_ok(
        &t,
        &[
            "add",
            "dave",
            "--company",
            "acme",
            "--password",
            "dave-password-1",
        ],
        None,
    );
    assert!(said.contains("dave"), "{said}");
    let list = cli_ok(&t, &["list"], None);
    assert!(
        list.lines().any(|l| l.starts_with("dave\tacme\tUSER")),
        "{list}"
    );
    // Usable at once, no restart.
    let dave = t.token_for("dave", "dave-password-1");
    assert_accepted_everywhere(&t, &dave, "a user added live");
    cli_refusals(&t, "running");

    cli_ok(&t, &["set-roles", "dave", "BOT"], None);
    assert_refused_everywhere(&t, &dave, "dave's token after set-roles");
    let dave = t.token_for("dave", "dave-password-1");
    assert_eq!(
        validate(&t, &dave).1,
        json!({"valid": true, "roles": ["BOT"]})
    );

    cli_ok(&t, &["passwd", "dave"], Some("dave-password-2\n"));
    assert_refused_everywhere(&t, &dave, "dave's token after a live passwd");
    assert_eq!(
        login(
            &t,
            &json!({"username": "dave", "password": "dave-password-1"})
        )
        .status(),
        401
    );
    let dave = t.token_for("dave", "dave-password-2");
    assert_accepted_everywhere(&t, &dave, "after passwd");

    // A config user's password changed live is kept (the config's is not re-applied).
    let alice = t.token("alice");
    cli_ok(
        &t,
        &["passwd", "alice", "--password", "alice-password-live"],
        None,
    );
    assert_refused_everywhere(&t, &alice, "alice after a live passwd");
    t.token_for("alice", "alice-password-live");

    let said = cli_ok(&t, &["remove", "dave"], None);
    assert!(said.contains("dave"), "{said}");
    assert_refused_everywhere(&t, &dave, "a user removed live");
    assert_eq!(
        login(
            &t,
            &json!({"username": "dave", "password": "dave-password-2"})
        )
        .status(),
        401
    );
    assert!(!cli_ok(&t, &["list"], None).contains("dave"));

    // The removed account's records stay under its name: a new account never gets it (it
    // would read them as its own), and the old tokens stay dead.
    let out = t.user_cli(
        &[
            "add",
            "dave",
            "--company",
            "other_co",
            "--roles",
            "ADMIN",
            "--password",
            "dave-password-3",
        ],
        None,
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("'dave' was removed"), "{said}");
    assert_refused_everywhere(
        &t,
        &dave,
        "a removed user's token after the name is asked again",
    );
    assert_eq!(validate(&t, &dave).1["valid"], false);
    cli_ok(
        &t,
        &[
            "add",
            "dave_2",
            "--company",
            "other_co",
            "--password",
            "dave-password-3",
        ],
        None,
    );
    let new_dave = t.token_for("dave_2", "dave-password-3");
    assert_accepted_everywhere(&t, &new_dave, "the new dave_2");
}

#[test]
fn account_info_reads_and_writes_the_stored_fields() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let put = |token: &str, body: Value| {
        client()
            .put(t.url("/account/info"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .unwrap()
    };
    let info: Value = t.get("/account/info", &alice).json().unwrap();
    assert_eq!(
        info,
        json!({"username": "alice", "name": null, "email": null, "phone": null, "company_key": "acme", "timezone": 3})
    );

    // Explicit nulls, as the official client sends them.
    let r = put(
        &alice,
        json!({"username": "alice", "name": null, "email": null, "phone": null, "company_key": "acme", "timezone": 3}),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap(), info);

    let full = json!({"username": "alice", "name": "Alice Liddell", "email": "alice@acme.example", "phone": "+1 555 0100",
                      "company_key": "acme", "timezone": 3});
    let r = put(&alice, full.clone());
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap(), full);
    assert_eq!(
        t.get("/account/info", &alice).json::<Value>().unwrap(),
        full
    );

    // Refusals: 400 naming the field, 403 for what a USER may not do; nothing changes.
    let with = |k: &str, v: Value| {
        let mut b = full.clone();
        b[k] = v;
        b
    };
    for (body, status, field) in [
        (with("email", json!("not-an-email")), 400, "email"),
        (with("email", json!("a@b")), 400, "email"),
        (with("email", json!("a b@c.de")), 400, "email"),
        (with("timezone", json!(13)), 400, "timezone"),
        (with("timezone", json!(-13)), 400, "timezone"),
        (with("timezone", json!("3")), 400, "timezone"),
        (with("name", json!("A")), 400, "name"),
        (with("name", json!("n".repeat(257))), 400, "name"),
        (with("phone", json!("1234")), 400, "phone"),
        (with("phone", json!("1".repeat(33))), 400, "phone"),
        (
            with("phone", json!("\u{0}\u{0}\u{0}\u{0}\u{0}")),
            400,
            "phone",
        ),
        (with("name", json!("Al\u{7}ice")), 400, "name"),
        (with("email", json!("al\u{0}ice@acme.com")), 400, "email"),
        (with("username", json!("a")), 400, "username"),
        (with("company_key", json!("ac")), 400, "company_key"),
        // Each part may be 256; together they must fit the tracedata client (256).
        (
            with("company_key", json!("c".repeat(252))),
            400,
            "company_key",
        ),
        (with("username", json!("bob")), 403, "username"),
        (with("company_key", json!("evil_corp")), 403, "company_key"),
        (json!({"name": "Alice"}), 400, "username"),
    ] {
        let r = put(&alice, body.clone());
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().unwrap();
        assert_error_shape(&v, "ACCOUNT");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
        assert_eq!(v["tracedata"]["client"], "acme_|_alice");
    }
    assert_eq!(
        t.get("/account/info", &alice).json::<Value>().unwrap(),
        full,
        "refusals change nothing"
    );
    let bob = t.token("bob");
    assert_eq!(
        t.get("/account/info", &bob).json::<Value>().unwrap()["name"],
        Value::Null,
        "bob untouched"
    );

    // Empty strings mean "not set" and come back as null, never "".
    let r = put(
        &alice,
        json!({"username": "alice", "name": "", "email": "", "phone": "", "company_key": "acme", "timezone": 3}),
    );
    assert_eq!(r.status(), 200);
    let v = t.get("/account/info", &alice).json::<Value>().unwrap();
    for k in ["name", "email", "phone"] {
        assert_eq!(v[k], Value::Null, "{k}: {v}");
    }

    // An ADMIN may update another user.
    let admin = t.token("root_admin");
    let r = put(
        &admin,
        json!({"username": "bob", "name": "Robert", "email": null, "phone": null, "company_key": "acme", "timezone": -2}),
    );
    assert_eq!(r.status(), 200, "{:?}", r.text());
    let v = t.get("/account/info", &bob).json::<Value>().unwrap();
    assert_eq!(v["name"], "Robert");
    assert_eq!(v["timezone"], -2);
    assert_eq!(
        t.get("/account/info", &admin).json::<Value>().unwrap()["name"],
        Value::Null,
        "the admin's own record untouched"
    );
    let r = put(
        &admin,
        json!({"username": "nobody_here", "company_key": "acme"}),
    );
    assert_eq!(r.status(), 404);
    assert_error_shape(&r.json().unwrap(), "ACCOUNT");
    // The name recorded for calls without a token is no company's: its PARTNERs would see
    // those calls.
    let r = put(
        &admin,
        json!({"username": "alice", "company_key": "anonymous"}),
    );
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_error_shape(&v, "ACCOUNT");
    assert!(
        v["message"].as_str().unwrap().contains("company_key"),
        "{v}"
    );
    assert_eq!(
        t.get("/account/info", &t.token("alice"))
            .json::<Value>()
            .unwrap()["company_key"],
        "acme",
        "alice stays where she was"
    );
}

#[test]
fn a_timezone_change_shows_in_tracedata_offsets() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let offset_of_an_error = |token: &str| -> String {
        // A 400 from the account API and one from a proxied route (invalid JSON where points count).
        let r = client()
            .put(t.url("/account/info"))
            .bearer_auth(token)
            .json(&json!({"username": "alice", "company_key": "acme", "name": "x"}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 400);
        let account: Value = r.json().unwrap();
        let r = client()
            .post(t.url("/universal/plan/calculation"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .unwrap();
        assert_eq!(r.status(), 400);
        let proxied: Value = r.json().unwrap();
        let offset = |v: &Value| v["tracedata"]["time"].as_str().unwrap()[19..].to_string();
        assert_eq!(offset(&account), offset(&proxied), "{account} {proxied}");
        offset(&account)
    };
    assert_eq!(offset_of_an_error(&alice), "+03:00");
    let r = client()
        .put(t.url("/account/info"))
        .bearer_auth(&alice)
        .json(&json!({"username": "alice", "company_key": "acme", "timezone": -5}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(offset_of_an_error(&alice), "-05:00");
}

#[test]
fn route_roles_are_enforced() {
    let t = Tollgate::start_extra(
        r#"
[[routes]]
method = "GET"
path = "/routing/system/version"
upstream = "demo"
service = "ROUTING"
method_group = "NOTRACE"
operation = "get_routing_version"
roles = ["ADMIN"]
"#,
    );
    let r = t.get("/routing/system/version", &t.token("alice"));
    assert_eq!(r.status(), 403);
    let v: Value = r.json().unwrap();
    assert_error_shape(&v, "ROUTING");
    assert_eq!(v["tracedata"]["client"], "acme_|_alice");
    assert_eq!(
        t.get("/routing/system/version", &t.token("paula")).status(),
        403
    );
    assert_eq!(
        t.get("/routing/system/version", &t.token("root_admin"))
            .status(),
        200
    );
    // Routes without roles stay open to every role.
    assert_eq!(proxied(&t, &t.token("alice")).status(), 200);
}

#[test]
fn the_signing_secret_is_private_random_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let mut a = Tollgate::start();
    let b = Tollgate::start();
    let path = a.dir.path().join("store/jwt-secret");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret file mode {mode:o}");
    // Password hashes and captured bodies are below the store's folder: the owner's only.
    let store = a.dir.path().join("store");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "store folder mode {mode:o}");
    let (sa, sb) = (secret_of(&a), secret_of(&b));
    assert!(sa.len() >= 32, "at least 256 bits");
    assert_ne!(sa, sb, "two fresh stores must not share a secret");
    // A token of one instance means nothing to the other.
    let token = a.token("alice");
    assert_eq!(validate(&b, &token).1["valid"], false);
    assert_eq!(b.get("/account/info", &token).status(), 401);
    // The secret is kept across restarts, and so are the tokens it signed.
    a.terminate();
    a.spawn();
    assert_eq!(secret_of(&a), sa);
    assert_eq!(a.get("/account/info", &token).status(), 200);
}

/// The status and JSON body of a raw HTTP/1.1 answer.
fn parse_raw_answer(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn account_bodies_that_cannot_be_read_get_an_answer_in_the_api_shape() {
    let t = Tollgate::start();
    // Malformed chunked bodies: a 400 naming the body, never a silent close.
    for chunk_size in ["zz", "-1", "ffffffffffffffffff"] {
        for path in ["/account/token/generation", "/account/token/validation"] {
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{chunk_size}\r\nabc\r\n0\r\n\r\n"
            );
            let raw = raw_exchange(t.port, request.as_bytes(), Duration::from_secs(5));
            let (status, body) = parse_raw_answer(&raw);
            assert_eq!(
                status,
                400,
                "{path} with chunk size {chunk_size:?}: {}",
                String::from_utf8_lossy(&raw)
            );
            assert_error_shape(&body, "ACCOUNT");
            assert!(
                body["message"].as_str().unwrap().starts_with("body: "),
                "{body}"
            );
        }
    }
    // Over the account API's limit: 413 on every operation that reads a body, token
    // validation (which also takes a bare token as text) included.
    let huge = format!("\"{}\"", "a".repeat(1 << 20));
    for path in ["/account/token/validation", "/account/token/generation"] {
        let r = client()
            .post(t.url(path))
            .header("Content-Type", "application/json")
            .body(huge.clone())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 413, "{path}");
        let body: Value = r.json().unwrap();
        assert_error_shape(&body, "ACCOUNT");
        assert!(
            body["message"].as_str().unwrap().contains("larger than"),
            "{body}"
        );
    }
    // The server goes on answering.
    assert_eq!(validate(&t, &t.token("alice")).1["valid"], true);
}

#[test]
fn wrong_current_passwords_count_as_failed_logins() {
    let t = throttled(3, 100_000);
    let bob = t.token("bob");
    for _ in 0..3 {
        let r = change_password(&t, &bob, "not-the-password", "bob-new-password-2");
        assert_eq!(r.status(), 401);
    }
    // A token is no way around the allowance: the right password waits too, here and at login.
    let message = assert_throttled(
        change_password(&t, &bob, "bob-password-1", "bob-new-password-2"),
        "a password change after the allowance",
    );
    assert!(message.starts_with("current_password: "), "{message}");
    assert_throttled(
        login(
            &t,
            &json!({"username": "bob", "password": "bob-password-1"}),
        ),
        "bob's login after guesses through the password change",
    );
    assert_accepted_everywhere(&t, &bob, "bob's token, unchanged");
}

#[test]
fn an_unknown_account_operation_names_the_caller_whose_token_is_good() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let tracedata = |body: &Value| {
        let t = &body["detail"]["tracedata"];
        if t.is_null() {
            body["tracedata"].clone()
        } else {
            t.clone()
        }
    };
    // An unknown resource is a 404; a known one asked with a method it does not serve, a 405
    // naming those it does.
    for (method, path, status, allow) in [
        (
            reqwest::Method::POST,
            "/account/info",
            405,
            Some("GET, HEAD, PUT"),
        ),
        (
            reqwest::Method::DELETE,
            "/account/system/version",
            405,
            Some("GET, HEAD"),
        ),
        (
            reqwest::Method::GET,
            "/account/token/generation",
            405,
            Some("POST"),
        ),
        (
            reqwest::Method::PUT,
            "/account/data/x",
            405,
            Some("GET, HEAD"),
        ),
        (
            reqwest::Method::GET,
            "/account/no_such_operation",
            404,
            None,
        ),
    ] {
        let r = client()
            .request(method.clone(), t.url(path))
            .bearer_auth(&alice)
            .send()
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        assert_eq!(
            r.headers().get("allow").map(|v| v.to_str().unwrap()),
            allow,
            "{method} {path}"
        );
        let body: Value = r.json().unwrap();
        assert_error_shape(&body, "ACCOUNT");
        assert_eq!(tracedata(&body)["client"], "acme_|_alice", "{body}");
        if status == 405 {
            let message = body["message"].as_str().unwrap();
            assert!(message.starts_with("method: "), "{message}");
        }
        // Without a good token: anonymous, and the same answer.
        let r = client()
            .request(method.clone(), t.url(path))
            .bearer_auth("not-a-token")
            .send()
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        let body: Value = r.json().unwrap();
        assert_eq!(tracedata(&body)["client"], "anonymous", "{body}");
    }
}

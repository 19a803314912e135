//! Tokens, passwords and account info: POST /account/token/generation, /token/validation,
//! /password, and GET/PUT /account/info, with every bound of the API's models.

use serde::{Deserialize, Serialize};

use super::{check_len, check_text, check_word, AccountResponse, Call};
use crate::auth::{DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS};
use crate::error::ApiError;
use crate::model::Role;
use crate::store::UserRecord;
use crate::trace;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    username: String,
    password: String,
    ttl_seconds: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordRequest {
    current_password: String,
    new_password: String,
}

#[derive(Serialize)]
struct TokenValidationResult {
    valid: bool,
    roles: Vec<Role>,
}

/// AccountInfo as the API reads and writes it; absent and null both mean "not set".
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountInfo {
    username: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    company_key: String,
    #[serde(default)]
    timezone: Option<i64>,
}

impl AccountInfo {
    fn of(user: &UserRecord) -> AccountInfo {
        AccountInfo {
            username: user.username.clone(),
            name: user.name.clone(),
            email: user.email.clone(),
            phone: user.phone.clone(),
            company_key: user.company_key.clone(),
            timezone: Some(user.timezone as i64),
        }
    }
}

pub async fn token_generation(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let req: TokenRequest = call.body()?;
    call.tried = Some(req.username.clone());
    check_word("username", &req.username, 2, 256)?;
    check_len("password", &req.password, 1, 1000)?;
    let ttl_seconds = req.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS as i64);
    if ttl_seconds < MIN_TTL_SECONDS as i64 || ttl_seconds > MAX_TTL_SECONDS as i64 {
        return Err(ApiError::invalid(
            "ttl_seconds",
            format!("must be {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}, got {ttl_seconds}"),
        ));
    }
    let token = call
        .app
        .authority
        .login(
            &req.username,
            &req.password,
            ttl_seconds as u64,
            call.req.client_ip,
        )
        .await?;
    Ok(AccountResponse::json(&token))
}

pub fn token_validation(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let body = call.raw_body()?;
    // The official client sends a JSON string; a bare token as text is accepted too.
    let token: String = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(_) => {
            return Err(ApiError::invalid(
                "body",
                "must be the token as a JSON string",
            ))
        }
        Err(_) => String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::invalid("body", "must be the token as a JSON string or text"))?
            .trim()
            .to_string(),
    };
    check_len("token", &token, 1, 1000)?;
    let roles = call.app.authority.validate(&token);
    Ok(AccountResponse::json(&TokenValidationResult {
        valid: roles.is_some(),
        roles: roles.unwrap_or_default(),
    }))
}

pub async fn password_change(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let user = call.caller()?;
    let req: PasswordRequest = call.body()?;
    check_len("current_password", &req.current_password, 1, 1000)?;
    check_len("new_password", &req.new_password, 1, 1000)?;
    let token = call
        .app
        .authority
        .change_password(
            &user,
            &req.current_password,
            &req.new_password,
            call.req.client_ip,
        )
        .await?;
    Ok(AccountResponse::json(&token))
}

pub fn info_get(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let user = call.caller()?;
    Ok(AccountResponse::json(&AccountInfo::of(&user)))
}

/// A plausible e-mail address: one `@`, something before it, a dotted domain after it.
fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(char::is_whitespace)
}

pub fn info_put(call: &mut Call<'_>) -> Result<AccountResponse, ApiError> {
    let caller = call.caller()?;
    let info: AccountInfo = call.body()?;
    check_word("username", &info.username, 2, 256)?;
    check_word("company_key", &info.company_key, 3, 256)?;
    if crate::model::is_reserved_name(&info.company_key) {
        return Err(ApiError::invalid(
            "company_key",
            crate::model::RESERVED_NAME_RULE,
        ));
    }
    trace::check_client_label(&info.company_key, &info.username)
        .map_err(|rule| ApiError::invalid("company_key", rule))?;
    // Empty strings from a form mean "not set" as much as null does.
    let none_if_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let (name, email, phone) = (
        none_if_empty(info.name),
        none_if_empty(info.email),
        none_if_empty(info.phone),
    );
    if let Some(n) = &name {
        check_text("name", n, 2, 256)?;
    }
    if let Some(e) = &email {
        check_text("email", e, 5, 256)?;
        if !is_email(e) {
            return Err(ApiError::invalid(
                "email",
                "must be an e-mail address (name@domain.tld)",
            ));
        }
    }
    if let Some(p) = &phone {
        check_text("phone", p, 5, 32)?;
    }
    let timezone = info.timezone.unwrap_or(0);
    if !(-12..=12).contains(&timezone) {
        return Err(ApiError::invalid(
            "timezone",
            format!("must be -12..12, got {timezone}"),
        ));
    }
    let admin = caller.roles.contains(&Role::ADMIN);
    if info.username != caller.username && !admin {
        return Err(ApiError::forbidden(
            "username: only an ADMIN may update another user's info",
        ));
    }
    // From the stored record, so a concurrent password change is never undone.
    let company_key = info.company_key;
    let target = call
        .app
        .authority
        .update(&info.username, |target| {
            if company_key != target.company_key && !admin {
                return Err(ApiError::forbidden(
                    "company_key: only an ADMIN may move a user to another company",
                ));
            }
            target.name = name;
            target.email = email;
            target.phone = phone;
            target.move_to_company(company_key);
            target.timezone = timezone as i32;
            Ok(())
        })?
        .ok_or_else(|| ApiError::not_found(info.username.clone()))?;
    Ok(AccountResponse::json(&AccountInfo::of(&target)))
}

#[cfg(test)]
mod tests {
    use super::is_email;

    #[test]
    fn email_form() {
        assert!(is_email("admin@company.com"));
        assert!(!is_email("admin.company.com"));
        assert!(!is_email("a@b"));
        assert!(!is_email("a b@c.d"));
        assert!(!is_email("@c.de"));
    }
}

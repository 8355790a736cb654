//! Security basics on a running native stack: the services' MySQL user
//! reaches its own database only, and no secret — the MySQL password, the
//! operator token, the partner's private key — reaches a log, an admin
//! endpoint or what `labctl status` prints.
//!
//! Checked elsewhere: the containers' user, read-only root filesystem and
//! what the image carries (`compose.rs`, statically: there is no container
//! engine here); B refusing a partner certificate from another CA
//! (`partner.rs`).

use std::{path::PathBuf, process::Command, time::Duration};

use lab_tests::{TestLab, eventually, get_json};

fn binary(name: &str) -> PathBuf {
    labctl::procs::find_lab_binary(name, None)
        .unwrap_or_else(|e| panic!("{e:#} (run `cargo build --workspace` before the tests)"))
}

/// A MySQL error's number (e.g. 1142: a command denied on a table).
fn mysql_number(error: &sqlx::Error) -> Option<u16> {
    error
        .as_database_error()?
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_mysql_user_reaches_its_own_database_only() -> anyhow::Result<()> {
    let lab = TestLab::start(1, &["mode=fixed", "worker.cpu_per_kib=0s"]).await?;
    // B migrated its schema and reads and writes its rows with these grants.
    let reply = get_json(&format!("{}/api/items/7", lab.a_url())).await?;
    assert_eq!(reply.0, 200, "{reply:?}");
    lab.insert_jobs(2, 0.0).await?;
    eventually(Duration::from_secs(20), "both jobs done", || async {
        let done = lab
            .metric("service-b-1", "lab_jobs_total", &[("outcome", "done")])
            .await;
        (done >= Some(2.0)).then_some(())
    })
    .await?;

    let db = lab.db().await?;
    // B's own credentials, not root's.
    let user: String = sqlx::query_scalar("SELECT CURRENT_USER()")
        .fetch_one(&db)
        .await?;
    assert_eq!(user, "lab@%");
    let grants: Vec<String> = sqlx::query_scalar("SHOW GRANTS").fetch_all(&db).await?;
    println!("grants of the services' user: {grants:#?}");
    assert!(!grants.is_empty());
    for grant in &grants {
        let on_own_database = grant.contains(" ON `lab`.* TO ");
        let login_only = grant.starts_with("GRANT USAGE ON *.* TO ");
        assert!(
            (on_own_database || login_only)
                && !grant.contains("ALL PRIVILEGES")
                && !grant.contains("GRANT OPTION"),
            "a grant beyond the lab database: {grant}"
        );
    }

    // What an attacker holding B's credentials would try first.
    let denied = [
        // 1142: SELECT command denied on table `mysql`.`user`.
        ("SELECT COUNT(*) FROM mysql.user", 1142),
        // 1044: access denied to database `elsewhere`.
        ("CREATE DATABASE elsewhere", 1044),
        // 1227: SUPER or SYSTEM_VARIABLES_ADMIN needed.
        ("SET GLOBAL max_connections = 5", 1227),
        // 1227 again: FILE needed.
        ("SELECT 1 INTO OUTFILE '/tmp/lab-leak'", 1227),
    ];
    for (statement, code) in denied {
        let outcome = sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&db)
            .await;
        let error = outcome
            .err()
            .unwrap_or_else(|| panic!("{statement:?} ran as the services' user"));
        println!("{statement}: {error}");
        assert_eq!(mysql_number(&error), Some(code), "{statement}: {error}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_an_admin_endpoint_or_labctl_output() -> anyhow::Result<()> {
    let lab = TestLab::start(2, &["mode=fixed", "worker.cpu_per_kib=0s"]).await?;
    let token = lab.admin_token();
    assert!(token.len() >= 32, "labctl up made a token");
    // Each lab's own MySQL password (32 hex digits), the one B uses.
    let state_dir = lab.stack.state.state_dir.clone();
    let password = std::fs::read_to_string(state_dir.join("mysql.password"))?;
    assert_eq!(password.len(), 32, "{password}");
    assert!(
        lab.stack
            .config
            .mysql
            .url
            .contains(&format!("lab:{password}@")),
        "B connects with it"
    );
    // The partner's private key: every line of its PEM body. (The CA's
    // key is never written anywhere: partner-api's certs are signed in
    // memory and only the CA certificate is kept.)
    let key_pem = std::fs::read_to_string(&lab.stack.config.partner.key)?;
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
        .collect();
    assert!(!key_lines.is_empty(), "{key_pem}");

    // Everything that writes logs: requests good and bad, jobs and partner
    // calls, operator calls with the wrong and the right token, a switch
    // flipped live. What A answered is read too.
    let mut seen = Vec::new();
    for path in ["/api/items/1", "/api/items/x", "/api/items/99999999999"] {
        let (status, _, body, _) = get_json(&format!("{}{path}", lab.a_url())).await?;
        seen.push((format!("A's answer to {path} ({status})"), body.to_string()));
    }
    lab.insert_jobs(4, 0.25).await?;
    eventually(Duration::from_secs(20), "the jobs handled", || async {
        let mut handled = 0.0;
        for b in ["service-b-1", "service-b-2"] {
            for outcome in ["done", "dead"] {
                handled += lab
                    .metric(b, "lab_jobs_total", &[("outcome", outcome)])
                    .await
                    .unwrap_or(0.0);
            }
        }
        (handled >= 4.0).then_some(())
    })
    .await?;
    let wrong = lab_tests::plain_client()?
        .put(format!("{}/faults", lab.admin_url("service-b-1")?))
        .bearer_auth(format!("{token}-wrong"))
        .body(r#"{"worker":"bounded"}"#)
        .send()
        .await?;
    assert_eq!(wrong.status(), 403, "a wrong token is refused");
    let flip = lab
        .operator(
            "service-b-1",
            "PUT",
            "/faults",
            Some(r#"{"worker":"bounded"}"#.into()),
        )
        .await?;
    assert!(flip.status().is_success(), "{}", flip.status());

    // What a reader of the lab sees: every admin endpoint that answers
    // without the token, and labctl's status, as a table and as JSON.
    for service in ["service-a", "service-b-1", "service-b-2", "partner-api"] {
        let admin = lab.admin_url(service)?;
        for path in ["/metrics", "/faults", "/readyz", "/healthz"] {
            let body = lab_tests::plain_client()?
                .get(format!("{admin}{path}"))
                .send()
                .await?
                .text()
                .await?;
            seen.push((format!("{service} {path}"), body));
        }
    }
    for json in [false, true] {
        let mut status = Command::new(binary("labctl"));
        status.arg("status").arg("--state-dir").arg(&state_dir);
        if json {
            status.arg("--json");
        }
        let out = String::from_utf8_lossy(&status.output()?.stdout).into_owned();
        assert!(
            out.contains("mysql://lab:***@"),
            "labctl status lists MySQL with its password hidden:\n{out}"
        );
        seen.push((format!("labctl status (json: {json})"), out));
    }
    let logs = state_dir.join("logs");
    for entry in std::fs::read_dir(&logs)? {
        let path = entry?.path();
        let text = String::from_utf8_lossy(&std::fs::read(&path)?).into_owned();
        seen.push((path.display().to_string(), text));
    }
    let logged: usize = seen.iter().map(|(_, text)| text.len()).sum();
    println!("{} sources, {logged} bytes read", seen.len());
    assert!(
        seen.iter()
            .any(|(what, text)| what.ends_with("service-b-1.log")
                && text.contains("service-b serving")),
        "B's log was read"
    );

    for (what, text) in &seen {
        assert!(!text.contains(&token), "{what} shows the operator token");
        assert!(!text.contains(&password), "{what} shows MySQL's password");
        for line in &key_lines {
            assert!(!text.contains(line), "{what} shows the partner's key");
        }
    }
    Ok(())
}

/// A config error quotes the value it refuses, but not the password in it.
#[test]
fn a_refused_mysql_url_is_quoted_without_its_password() {
    let mut command = Command::new(binary("service-b"));
    // Only this test's LAB_* variable reaches the child.
    for (key, _) in std::env::vars() {
        if key.starts_with("LAB_") {
            command.env_remove(key);
        }
    }
    let out = command
        .env("LAB_MYSQL_URL", "postgres://lab:Sup3r-s3cret@db:5432/lab")
        .output()
        .expect("service-b runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mysql.url") && stderr.contains("postgres://lab:***@db:5432/lab"),
        "{stderr}"
    );
    assert!(!stderr.contains("Sup3r-s3cret"), "{stderr}");
}

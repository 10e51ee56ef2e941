//! `tessera dev-certs`: a development CA and one member certificate for mutual TLS
//! between the members of a cluster (`--tls-cert`, `--tls-key`, `--tls-ca`), written
//! with `rcgen`. Every member may use the same certificate: it carries the cluster's
//! server name (`--tls-server-name`), `localhost`, `127.0.0.1` and any `--san`, and is
//! good for both ends of a connection. In production use your organisation's CA or
//! cert-manager instead (`deploy/README.md`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tessera_runtime::tls::DEFAULT_SERVER_NAME;

/// `tessera dev-certs`.
#[derive(Debug, clap::Args)]
pub struct DevCertsArgs {
    /// Folder to write `ca.crt`, `ca.key`, `tls.crt` and `tls.key` into (created if
    /// missing; the keys are readable by their owner only).
    #[arg(long)]
    out: PathBuf,
    /// The name every member certificate carries (the members' --tls-server-name).
    #[arg(long, default_value = DEFAULT_SERVER_NAME)]
    server_name: String,
    /// Another DNS name or IP address the member certificate is valid for, e.g. an
    /// ingress host (repeatable; `localhost` and `127.0.0.1` are always in).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace files that are already in the folder.
    #[arg(long)]
    force: bool,
}

/// The four files written.
const FILES: [&str; 4] = ["ca.crt", "ca.key", "tls.crt", "tls.key"];

/// Writes the CA and the member certificate.
pub fn run(args: DevCertsArgs) -> anyhow::Result<()> {
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    if !args.force
        && let Some(existing) = FILES.iter().map(|f| args.out.join(f)).find(|p| p.exists())
    {
        bail!(
            "{} exists; pass --force to replace the certificates in {}",
            existing.display(),
            args.out.display()
        );
    }

    let ca_key = KeyPair::generate().context("cannot make the CA's key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Tessera development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca, args.days);
    let ca_cert = ca.self_signed(&ca_key).context("cannot sign the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec![args.server_name.clone(), "localhost".to_owned()];
    let mut ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into()];
    for san in &args.sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(san.clone()),
        }
    }
    let member_key = KeyPair::generate().context("cannot make the member's key")?;
    let mut member = CertificateParams::new(names)
        .context("a --server-name or --san is not a valid DNS name")?;
    member
        .subject_alt_names
        .extend(ips.into_iter().map(SanType::IpAddress));
    member
        .distinguished_name
        .push(DnType::CommonName, args.server_name.as_str());
    member.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    member.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    member.use_authority_key_identifier_extension = true;
    set_validity(&mut member, args.days);
    let member_cert = member
        .signed_by(&member_key, &issuer)
        .context("cannot sign the member certificate")?;

    write(&args.out.join("ca.crt"), &ca_cert.pem(), false)?;
    write(
        &args.out.join("ca.key"),
        &issuer.key().serialize_pem(),
        true,
    )?;
    write(&args.out.join("tls.crt"), &member_cert.pem(), false)?;
    write(&args.out.join("tls.key"), &member_key.serialize_pem(), true)?;
    let dir = args.out.display();
    println!(
        "wrote a development CA and a member certificate for {name} to {dir}, valid {days} \
         days; give every member\n  --tls-cert {dir}/tls.crt --tls-key {dir}/tls.key \
         --tls-ca {dir}/ca.crt --tls-server-name {name}",
        name = args.server_name,
        days = args.days,
    );
    Ok(())
}

/// Valid from a day ago (clock skew between machines) to `days` from now.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let date = |days_since_epoch: i64| {
        let (y, m, d) = civil_from_days(days_since_epoch);
        rcgen::date_time_ymd(y, m, d)
    };
    params.not_before = date(today - 1);
    params.not_after = date(today + i64::from(days));
}

/// The (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// Writes `text` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn days_since_the_epoch_are_civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_794), (2026, 12, 7));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}

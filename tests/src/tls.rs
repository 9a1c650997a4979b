//! Test certificates, made with the `openssl` command line into a directory (nothing is checked
//! into the repository): a CA, a server certificate for `localhost` and `127.0.0.1`, and client
//! certificates whose common name is a gateway id. Also a TLS configuration for raw rumqttc
//! clients.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A CA and a server certificate in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA certificate (PEM): trust anchor for both sides.
    pub ca: PathBuf,
    ca_key: PathBuf,
    /// The broker's certificate, valid for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A certificate and its private key.
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// Creates the CA and the server certificate (EC P-256, valid two days).
    pub fn create(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca = dir.join("ca.pem");
        let ca_key = dir.join("ca.key");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                path(&ca_key),
                "-out",
                path(&ca),
                "-days",
                "2",
                "-subj",
                "/CN=gatewayd-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
        };
        let server = pki.leaf(
            "server",
            "localhost",
            "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        pki.server_cert = server.cert;
        pki.server_key = server.key;
        Ok(pki)
    }

    /// A client certificate with common name `cn` (a gateway id), signed by the CA.
    pub fn client(&self, cn: &str) -> Result<CertPair> {
        self.leaf(&format!("client-{cn}"), cn, "extendedKeyUsage=clientAuth\n")
    }

    /// A client certificate signed by a CA nobody trusts.
    pub fn rogue_client(&self, cn: &str) -> Result<CertPair> {
        let rogue = Pki::create(&self.dir.join("rogue"))?;
        rogue.client(cn)
    }

    fn leaf(&self, name: &str, cn: &str, ext: &str) -> Result<CertPair> {
        static SERIAL: AtomicU64 = AtomicU64::new(2);
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.pem"));
        let extfile = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &extfile,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"
            ),
        )?;
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                path(&key),
                "-out",
                path(&csr),
                "-subj",
                &format!("/CN={cn}"),
            ],
        )?;
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed).to_string();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                path(&csr),
                "-CA",
                path(&self.ca),
                "-CAkey",
                path(&self.ca_key),
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-out",
                path(&cert),
                "-extfile",
                path(&extfile),
            ],
        )?;
        Ok(CertPair { cert, key })
    }

    /// rumqttc TLS settings trusting this CA, with `client` as the client certificate.
    pub fn rumqttc_tls(&self, client: Option<&CertPair>) -> Result<rumqttc::TlsConfiguration> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)? {
            roots.add(cert?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config = match client {
            Some(pair) => {
                let certs =
                    CertificateDer::pem_file_iter(&pair.cert)?.collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&pair.key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("cannot run openssl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

//! A minimal NBD client for the demo's writer: fixed-newstyle handshake with EXPORT_NAME, then
//! one request at a time (WRITE, FLUSH, DISC). Real workloads use the kernel client, QEMU or
//! qemu-io; this exists so `lifeboat demo` needs nothing installed.
use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    pub async fn connect(address: &str, export: &str) -> anyhow::Result<NbdClient> {
        let mut stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connect to NBD server {address}"))?;
        if stream.read_u64().await? != NBDMAGIC || stream.read_u64().await? != IHAVEOPT {
            bail!("{address} is not a fixed-newstyle NBD server");
        }
        let _handshake_flags = stream.read_u16().await?;
        stream
            .write_u32(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .await?;
        stream.write_u64(IHAVEOPT).await?;
        stream.write_u32(OPT_EXPORT_NAME).await?;
        stream.write_u32(export.len() as u32).await?;
        stream.write_all(export.as_bytes()).await?;
        let size = stream
            .read_u64()
            .await
            .with_context(|| format!("export {export} refused"))?;
        let _transmission_flags = stream.read_u16().await?;
        Ok(NbdClient {
            stream,
            size,
            cookie: 0,
        })
    }

    async fn request(&mut self, kind: u16, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.cookie += 1;
        let mut header = Vec::with_capacity(28);
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&kind.to_be_bytes());
        header.extend_from_slice(&self.cookie.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.stream.write_all(&header).await?;
        self.stream.write_all(data).await?;
        if kind == CMD_DISC {
            return Ok(());
        }
        if self.stream.read_u32().await? != REPLY_MAGIC {
            bail!("bad NBD reply");
        }
        let error = self.stream.read_u32().await?;
        let cookie = self.stream.read_u64().await?;
        if cookie != self.cookie {
            bail!("NBD reply for another request");
        }
        if error != 0 {
            bail!("NBD request failed with error {error}");
        }
        Ok(())
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.request(CMD_WRITE, offset, data).await
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.request(CMD_FLUSH, 0, &[]).await
    }

    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.request(CMD_DISC, 0, &[]).await
    }
}

//! [`Place`] and the facade's [`Advice`]: processors named as the [`crate::Device`] handles name
//! them, so that a name kept past a `detach` cannot reach the next device given the same id.
//!
//! The core names a device by its slot ([`DeviceId`]), which `attach` gives again once the
//! device is detached. A [`Proc`] a program took from a handle (to migrate or prefetch to, to
//! prefer) then moved data to whatever device was attached next (found by an audit). A place
//! from a handle also carries its attachment's number, which is never given again: the calls
//! taking it refuse it ([`CoreError::Detached`]) once that device is detached.

use hetmm_core::error::CoreError;
use hetmm_core::types::{DeviceId, Proc};
use hetmm_core::AddressSpace;

use crate::{Error, Result};

/// A processor to move data to or to give advice about: the CPU, or a device as the handle it
/// came from ([`crate::Device::proc`]) attached it.
///
/// A [`Proc`] converts to a place that names the processor by its id alone (the caller's word
/// that the id is the device meant): `Proc::Cpu` is the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Place {
    proc: Proc,
    /// The device's attachment (see [`AddressSpace::attachment_of`]); `None`: the CPU, or a
    /// device named by its id alone.
    attachment: Option<u64>,
}

impl Place {
    /// The CPU.
    pub const CPU: Place = Place { proc: Proc::Cpu, attachment: None };

    /// Device `id` as its attachment number `attachment` (see [`crate::Device::proc`]).
    pub(crate) fn attached(id: DeviceId, attachment: u64) -> Self {
        Place { proc: Proc::Device(id), attachment: Some(attachment) }
    }

    /// The processor, as the core names it (by id: it may be another device by now).
    pub fn proc(self) -> Proc {
        self.proc
    }

    /// The processor, refused ([`CoreError::Detached`]) where the device it came from is no
    /// longer attached to `space` (another device may have its id now), or never was (it is
    /// another address space's).
    pub(crate) fn checked(self, space: &AddressSpace) -> Result<Proc> {
        match (self.proc, self.attachment) {
            (Proc::Device(id), Some(n)) if !space.is_attachment(id, n) => Err(CoreError::Detached(id).into()),
            (p, _) => Ok(p),
        }
    }

    /// The device, checked as by [`Place::checked`]; the CPU is refused ([`Error::NotADevice`])
    /// for `what`, advice that only a device can take.
    fn device(self, space: &AddressSpace, what: &'static str) -> Result<DeviceId> {
        match self.checked(space)? {
            Proc::Device(id) => Ok(id),
            Proc::Cpu => Err(Error::NotADevice { what }),
        }
    }
}

impl From<Proc> for Place {
    fn from(proc: Proc) -> Self {
        Place { proc, attachment: None }
    }
}

impl From<Place> for Proc {
    fn from(p: Place) -> Self {
        p.proc
    }
}

/// A hint about a range ([`crate::Hetmm::advise`]): the core's [`hetmm_core::Advice`], with
/// processors named as [`Place`]s, checked when the advice is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// See [`hetmm_core::Advice::Prefetch`].
    Prefetch(Place),
    /// See [`hetmm_core::Advice::DontNeed`].
    DontNeed,
    /// See [`hetmm_core::Advice::PreferredLocation`].
    PreferredLocation(Option<Place>),
    /// See [`hetmm_core::Advice::ReadMostly`].
    ReadMostly(bool),
    /// See [`hetmm_core::Advice::AccessedBy`]: the place must be a device.
    AccessedBy(Place, bool),
    /// See [`hetmm_core::Advice::Pin`].
    Pin(bool),
}

impl Advice {
    /// The core's advice, its places checked against `space` (see [`Place::checked`]).
    pub(crate) fn checked(self, space: &AddressSpace) -> Result<hetmm_core::Advice> {
        use hetmm_core::Advice as A;
        Ok(match self {
            Advice::Prefetch(p) => A::Prefetch(p.checked(space)?),
            Advice::DontNeed => A::DontNeed,
            Advice::PreferredLocation(p) => A::PreferredLocation(p.map(|p| p.checked(space)).transpose()?),
            Advice::ReadMostly(on) => A::ReadMostly(on),
            Advice::AccessedBy(p, on) => A::AccessedBy(p.device(space, "AccessedBy")?, on),
            Advice::Pin(on) => A::Pin(on),
        })
    }
}

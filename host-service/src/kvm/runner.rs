//! vCPU threads that can be stopped promptly: the pause half of pause and resume.
//!
//! Each vCPU runs `KVM_RUN` in its own thread. [`VcpuThread::stop`] sets a stop flag and kicks the
//! thread with a real-time signal whose handler sets `immediate_exit` in the vCPU's `kvm_run`
//! page: a vCPU inside `KVM_RUN` leaves it with `EINTR`, and one about to enter returns at once,
//! so there is no window in which the kick is lost. The thread then hands its [`Vcpu`] back, ready
//! for state capture; resuming is spawning a new thread with it.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::vcpu::{Vcpu, VcpuError, VcpuExitKind};
use crate::devices::bus::Buses;

/// Offset from `SIGRTMIN` of the signal that kicks vCPU threads.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// Address of `immediate_exit` in the `kvm_run` page of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer is set by this thread to the `immediate_exit` byte of its vCPU's
        // `kvm_run` mapping, which stays mapped while it is set (it is cleared before the vCPU
        // leaves the thread); a volatile byte store is async-signal-safe.
        unsafe { ptr.write_volatile(1) };
    }
}

/// What can go wrong with vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// The thread did not leave `KVM_RUN` in time.
    #[error("vCPU thread did not stop within {0:?}")]
    Timeout(Duration),
    /// The thread panicked.
    #[error("vCPU thread panicked")]
    Panicked,
    /// `KVM_RUN` failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// What the exit handler wants after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the vCPU again.
    Continue,
    /// End the thread (the guest halted or shut down) and hand the vCPU back.
    Stop,
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> Result<(), RunnerError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| RunnerError::Signal(vmm_sys_util::errno::Error::new(errno)))
}

/// A vCPU running in its own thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<Result<Vcpu, VcpuError>>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
}

impl VcpuThread {
    /// Starts `vcpu` in a new thread. Port I/O and MMIO exits go to `buses`; `on_exit` then
    /// sees every exit other than a kick.
    pub fn spawn<F>(mut vcpu: Vcpu, buses: Arc<Buses>, mut on_exit: F) -> Result<Self, RunnerError>
    where
        F: FnMut(&VcpuExitKind) -> ExitAction + Send + 'static,
    {
        install_kick_handler()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                let run = vcpu.fd_mut().get_kvm_run();
                IMMEDIATE_EXIT.with(|c| c.set(std::ptr::addr_of_mut!(run.immediate_exit)));
                let result = run_loop(&mut vcpu, &buses, &thread_stop, &mut on_exit);
                IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
                vcpu.fd_mut().set_kvm_immediate_exit(0);
                let _ = tx.send(());
                result.map(|()| vcpu)
            })
            .map_err(RunnerError::Spawn)?;
        Ok(Self { handle, stop, done })
    }

    /// Whether the thread has ended on its own (its handler returned [`ExitAction::Stop`] or
    /// `KVM_RUN` failed).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the vCPU — kicking it out of `KVM_RUN` if needed — and hands it back. Fails if it
    /// has not left `KVM_RUN` within `timeout`.
    pub fn stop(self, timeout: Duration) -> Result<Vcpu, RunnerError> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            if self.handle.is_finished() {
                break;
            }
            // A failed kick (the thread just ended) is fine: the loop sees it finished.
            let _ = self.handle.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            match self.done.recv_timeout(Duration::from_millis(10)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Err(RunnerError::Timeout(timeout));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        Ok(self.handle.join().map_err(|_| RunnerError::Panicked)??)
    }
}

fn run_loop<F>(
    vcpu: &mut Vcpu,
    buses: &Buses,
    stop: &AtomicBool,
    on_exit: &mut F,
) -> Result<(), VcpuError>
where
    F: FnMut(&VcpuExitKind) -> ExitAction,
{
    while !stop.load(Ordering::SeqCst) {
        match vcpu.run_with_buses(&buses.pio, &buses.mmio)? {
            VcpuExitKind::Interrupted => vcpu.fd_mut().set_kvm_immediate_exit(0),
            exit => {
                if on_exit(&exit) == ExitAction::Stop {
                    return Ok(());
                }
            }
        }
    }
    complete_pending_io(vcpu, buses, on_exit)
}

/// Most exits [`complete_pending_io`] handles before it gives up on a vCPU that keeps exiting
/// (a string I/O instruction exits once per element it cannot batch).
const MAX_COMPLETION_EXITS: usize = 4096;

/// Lets KVM finish the instruction of the last port I/O or MMIO exit before the vCPU is parked.
/// KVM completes such an exit (the value of a read, the instruction pointer past a port write)
/// only on the next `KVM_RUN`; until then the vCPU's registers are mid-instruction, and state
/// captured from them would repeat the access or lose the value read. With `immediate_exit`
/// set, `KVM_RUN` completes the pending operation and returns at once, before the guest runs
/// on. An operation that exits again (string I/O) is handled and completed in turn.
fn complete_pending_io<F>(vcpu: &mut Vcpu, buses: &Buses, on_exit: &mut F) -> Result<(), VcpuError>
where
    F: FnMut(&VcpuExitKind) -> ExitAction,
{
    for _ in 0..MAX_COMPLETION_EXITS {
        vcpu.fd_mut().set_kvm_immediate_exit(1);
        match vcpu.run_with_buses(&buses.pio, &buses.mmio)? {
            VcpuExitKind::Interrupted => return Ok(()),
            exit => {
                if on_exit(&exit) == ExitAction::Stop {
                    return Ok(());
                }
            }
        }
    }
    tracing::warn!(
        vcpu = vcpu.index(),
        "the vCPU kept exiting while its last I/O was completed; parked mid-instruction"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::kvm::memory::MemoryLayout;
    use crate::kvm::vm::Vm;

    #[test]
    fn a_busy_loop_without_exits_is_stopped_promptly() {
        let vm = Vm::new(&MemoryLayout::single(4 * 4096)).expect("vm");
        vm.memory()
            .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
            .expect("jmp $");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        let thread = VcpuThread::spawn(vcpu, Arc::default(), |exit| {
            panic!("no exit expected: {exit:?}")
        })
        .expect("spawn");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!thread.is_finished());
        let started = Instant::now();
        let vcpu = thread.stop(Duration::from_secs(5)).expect("stop");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        let rip = vcpu.save_state().expect("state").regs.rip;
        assert_eq!(rip, 0x1000, "stopped on the loop instruction");
    }

    #[test]
    fn pause_capture_and_resume_keeps_the_guest_counting() {
        // inc bx; mov [0x3000], bx; mov ax, bx; out 0x80, al; jmp loop
        let code = [
            0x43, 0x89, 0x1e, 0x00, 0x30, 0x89, 0xd8, 0xe6, 0x80, 0xeb, 0xf5,
        ];
        let vm = Vm::new(&MemoryLayout::single(16 * 4096)).expect("vm");
        vm.memory()
            .write_slice(&code, GuestAddress(0x1000))
            .expect("code");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        let exits = Arc::new(AtomicU64::new(0));
        let counter = {
            let exits = exits.clone();
            move |exit: &VcpuExitKind| {
                assert!(
                    matches!(exit, VcpuExitKind::IoOut { port: 0x80, .. }),
                    "{exit:?}"
                );
                exits.fetch_add(1, Ordering::SeqCst);
                ExitAction::Continue
            }
        };
        let thread = VcpuThread::spawn(vcpu, Arc::default(), counter.clone()).expect("spawn");
        std::thread::sleep(Duration::from_millis(30));
        let vcpu = thread.stop(Duration::from_secs(5)).expect("pause");
        let state = vcpu.save_state().expect("capture");
        let paused_at = state.regs.rbx;
        assert!(paused_at > 0, "the guest ran");
        let in_memory = vm
            .memory()
            .read_obj::<u16>(GuestAddress(0x3000))
            .expect("counter");
        assert!(u64::from(in_memory) + 1 >= paused_at);
        // Paused: nothing moves.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            vm.memory()
                .read_obj::<u16>(GuestAddress(0x3000))
                .expect("counter"),
            in_memory
        );

        let thread = VcpuThread::spawn(vcpu, Arc::default(), counter).expect("resume");
        std::thread::sleep(Duration::from_millis(30));
        let vcpu = thread.stop(Duration::from_secs(5)).expect("pause again");
        assert!(
            vcpu.save_state().expect("capture").regs.rbx > paused_at,
            "the guest kept counting"
        );
        assert!(exits.load(Ordering::SeqCst) >= paused_at);
    }

    /// Port 0x80 answers the n-th read with n; the fifth read holds until the test has asked
    /// the vCPU to stop, so the stop is seen right after a read exit was handled.
    struct CountingPort {
        reads: u8,
        fifth: mpsc::Sender<()>,
        stopping: Arc<AtomicBool>,
    }

    impl crate::devices::bus::BusDevice for CountingPort {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            self.reads = self.reads.wrapping_add(1);
            if self.reads == 5 {
                let _ = self.fifth.send(());
                while !self.stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            data.fill(self.reads);
        }

        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn a_vcpu_is_parked_with_its_last_port_read_completed() {
        // in al, 0x80; mov [0x3000], al; jmp back to the in
        let code = [0xe4, 0x80, 0xa2, 0x00, 0x30, 0xeb, 0xf9];
        let vm = Vm::new(&MemoryLayout::single(16 * 4096)).expect("vm");
        vm.memory()
            .write_slice(&code, GuestAddress(0x1000))
            .expect("code");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        let (fifth, at_fifth) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut buses = Buses::default();
        let port = CountingPort {
            reads: 0,
            fifth,
            stopping: stopping.clone(),
        };
        buses
            .pio
            .insert(0x80, 1, Arc::new(std::sync::Mutex::new(port)))
            .expect("port");
        let thread =
            VcpuThread::spawn(vcpu, Arc::new(buses), |_| ExitAction::Continue).expect("spawn");
        at_fifth
            .recv_timeout(Duration::from_secs(10))
            .expect("the fifth read");
        // The stop flag is up before the fifth read returns.
        let stopper = std::thread::spawn(move || thread.stop(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        stopping.store(true, Ordering::SeqCst);
        let vcpu = stopper.join().expect("join").expect("stop");
        let regs = vcpu.save_state().expect("state").regs;
        assert_eq!(regs.rax & 0xff, 5, "the fifth read reached AL");
        assert_eq!(regs.rip, 0x1002, "parked after the in, not on it");
        assert_eq!(
            vm.memory()
                .read_obj::<u8>(GuestAddress(0x3000))
                .expect("stored"),
            4,
            "and before the next instruction"
        );
    }

    #[test]
    fn the_handler_can_end_the_thread() {
        let vm = Vm::new(&MemoryLayout::single(4 * 4096)).expect("vm");
        vm.memory()
            .write_slice(&[0xf4], GuestAddress(0x1000))
            .expect("hlt");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        let thread = VcpuThread::spawn(vcpu, Arc::default(), |exit| {
            assert_eq!(*exit, VcpuExitKind::Hlt);
            ExitAction::Stop
        })
        .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(thread.is_finished());
        thread.stop(Duration::from_secs(1)).expect("join");
    }
}

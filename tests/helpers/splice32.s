# A 32-bit x86 program (IA32 emulation) for tests/splice.rs: one
# non-blocking splice(2) from fd 3 into a new pipe, made with int $0x80, so
# the kernel sees the 32-bit syscall number (313). Exits with -result & 0xff:
# 22 for EINVAL, 11 for EAGAIN, 0 for end of file, (256 - n) for n bytes.
	.globl _start
	.text
_start:
	mov $42, %eax		# pipe(fds)
	lea fds, %ebx
	int $0x80
	mov $313, %eax		# splice(3, NULL, fds[1], NULL, 4096, SPLICE_F_NONBLOCK)
	mov $3, %ebx
	xor %ecx, %ecx
	mov fds+4, %edx
	xor %esi, %esi
	mov $4096, %edi
	mov $2, %ebp
	int $0x80
	neg %eax
	mov %eax, %ebx
	mov $1, %eax		# exit
	int $0x80
	.data
fds:	.long 0, 0

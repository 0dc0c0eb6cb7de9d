@ An AArch32 program (32-bit ARM, EABI) for tests/arm64/splice_guard.c:
@ one non-blocking read of fd 3 into a new pipe by the 32-bit syscall its
@ first argument names, made with svc #0 so the kernel sees the AArch32
@ number: "s" splice (340), "f" sendfile (187), "F" sendfile64 (239).
@ Exits with -result & 0xff: 22 for EINVAL, 11 for EAGAIN, 0 for end of
@ file, (256 - n) for n bytes.
	.syntax unified
	.arm
	.globl _start
	.text
_start:
	ldr r8, [sp, #8]	@ argv[1]
	ldrb r8, [r8]		@ its first letter
	ldr r0, =fds		@ pipe(fds)
	mov r7, #42
	svc #0
	ldr r2, =fds
	ldr r2, [r2, #4]	@ fds[1]
	cmp r8, #'s'
	beq splice
	mov r0, r2		@ sendfile(fds[1], 3, NULL, 4096)
	mov r1, #3
	mov r2, #0
	mov r3, #4096
	ldr r7, =187
	cmp r8, #'F'
	ldreq r7, =239		@ sendfile64: the same arguments
	svc #0
	b done
splice:				@ splice(3, NULL, fds[1], NULL, 4096, SPLICE_F_NONBLOCK)
	mov r0, #3
	mov r1, #0
	mov r3, #0
	mov r4, #4096
	mov r5, #2
	ldr r7, =340
	svc #0
done:
	rsb r0, r0, #0
	mov r7, #1		@ exit
	svc #0
	.ltorg
	.data
fds:	.word 0, 0

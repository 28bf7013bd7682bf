/* desc_preserves(desc, out): call the TLS descriptor function of `desc` as gcc's
   -mtls-dialect=gnu2 code does (%rax = desc, call *(%rax)) with every other register set to
   a pattern (GPR k: k * 0x0101010101010101, %xmmK's low quadword: 0x1000 + K) and a stack
   that is not 16-byte aligned at the call; then store %rax and what each register holds
   into out[0..31] (out[1..13]: rcx rdx rsi rdi r8 r9 r10 r11 rbx rbp r12 r13 r14;
   out[16 + K]: xmmK's low quadword). For tests/test_host_tls.py. */
	.text
	.globl desc_preserves
	.type desc_preserves, @function
desc_preserves:
	push %rbx
	push %rbp
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsi, %r15
	mov %rdi, %rax
	.irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	mov $(0x1000 + \k), %ecx
	movq %rcx, %xmm\k
	.endr
	movabs $0x0101010101010101, %r14
	mov %r14, %rcx
	lea (%rcx,%r14), %rdx
	lea (%rdx,%r14), %rsi
	lea (%rsi,%r14), %rdi
	lea (%rdi,%r14), %r8
	lea (%r8,%r14), %r9
	lea (%r9,%r14), %r10
	lea (%r10,%r14), %r11
	lea (%r11,%r14), %rbx
	lea (%rbx,%r14), %rbp
	lea (%rbp,%r14), %r12
	lea (%r12,%r14), %r13
	lea (%r13,%r14), %r14
	call *(%rax)
	mov %rax, 0(%r15)
	mov %rcx, 8(%r15)
	mov %rdx, 16(%r15)
	mov %rsi, 24(%r15)
	mov %rdi, 32(%r15)
	mov %r8, 40(%r15)
	mov %r9, 48(%r15)
	mov %r10, 56(%r15)
	mov %r11, 64(%r15)
	mov %rbx, 72(%r15)
	mov %rbp, 80(%r15)
	mov %r12, 88(%r15)
	mov %r13, 96(%r15)
	mov %r14, 104(%r15)
	.irp k, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	movq %xmm\k, (128 + 8 * \k)(%r15)
	.endr
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbp
	pop %rbx
	ret
	.size desc_preserves, . - desc_preserves
	.section .note.GNU-stack, "", @progbits

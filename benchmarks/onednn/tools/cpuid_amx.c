#include <cpuid.h>
#include <stdio.h>
int main(){unsigned a,b,c,d;
__cpuid_count(0,0,a,b,c,d); printf("max leaf %u\n",a);
__cpuid_count(1,0,a,b,c,d); printf("family/model sig 0x%x\n",a);
__cpuid_count(7,0,a,b,c,d); printf("leaf7.0 edx amx_bf16=%u amx_tile=%u amx_int8=%u avx512_fp16=%u\n",(d>>22)&1,(d>>24)&1,(d>>25)&1,(d>>23)&1);
__cpuid_count(7,1,a,b,c,d); printf("leaf7.1 eax avx512_bf16=%u amx_fp16=%u\n",(a>>5)&1,(a>>21)&1);
unsigned lo,hi; __asm__ volatile("xgetbv":"=a"(lo),"=d"(hi):"c"(0)); printf("XCR0=0x%x%08x (tile bits 17,18: %u %u)\n",hi,lo,(lo>>17)&1,(lo>>18)&1);
}

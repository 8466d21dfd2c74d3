package dev.freshd.client;

/**
 * What a {@link WatchStream} delivers: {@link WatchStarted}, {@link NoticeBatch}, {@link Progress},
 * {@link Reset} or {@link Refused}.
 */
public sealed interface WatchEvent permits WatchStarted, NoticeBatch, Progress, Reset, Refused {}
